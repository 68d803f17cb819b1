"""Weight files that cannot be used give one line (and never run code): pickles, empty files, wrong shapes,
lists, another model type's checkpoint, a checkpoint without RNG states."""

from __future__ import annotations

import builtins

import pytest
import torch

from clip_tao.cli import main
from clip_tao.errors import ModelError
from clip_tao.models import create_model
from tests.family_assets import make_gemma_tokenizer, make_siglip_folder


class _Payload:
    """Unpickling this would create ``marker``: proof that no code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def _pickle_bomb(path, marker):
    torch.save({"state_dict": _Payload(marker)}, path)
    return path


def _error_line(stderr: str) -> str:
    (line,) = [part for part in stderr.replace("\r", "\n").splitlines() if part.startswith("clip-tao ")]
    return line


@pytest.mark.parametrize("kind", ["pickle", "empty", "empty.safetensors"])
def test_bad_open_clip_weight_files_are_one_line(tmp_path, kind):
    marker = tmp_path / "code-ran"
    if kind == "pickle":
        path = _pickle_bomb(tmp_path / "weights.pt", marker)
    else:
        path = tmp_path / ("weights.safetensors" if kind.endswith("safetensors") else "weights.pt")
        path.write_bytes(b"")
    with pytest.raises(ModelError, match=r"weights\.(pt|safetensors)'"):
        create_model("tiny-clip", pretrained_path=str(path))
    assert not marker.exists()


@pytest.fixture(scope="module")
def siglip_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("siglip")
    make_gemma_tokenizer(root / "gemma")
    make_siglip_folder(root / "model", root / "gemma")
    return root / "model"


@pytest.mark.parametrize("kind", ["pickle", "empty"])
def test_bad_weights_inside_a_siglip_folder_are_one_line(siglip_folder, tmp_path, kind):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(siglip_folder, folder)
    marker = tmp_path / "code-ran"
    (folder / "model.safetensors").unlink()
    if kind == "pickle":
        _pickle_bomb(folder / "pytorch_model.bin", marker)
    else:
        (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="cannot load SigLIP weights from"):
        create_model("siglip2-so400m-patch16-256", pretrained_path=str(folder))
    assert not marker.exists()


@pytest.mark.parametrize("content", ["wrong shapes", "a list", "pickle"])
def test_bad_evaluate_checkpoints_are_one_line(tiny_spec, tmp_path, capsys, content):
    spec = tiny_spec()
    path = tmp_path / "bad.pth"
    if content == "wrong shapes":
        state = {
            k: torch.zeros(3, *v.shape[1:]) for k, v in create_model("tiny-clip", pretrained=False).state_dict().items()
        }
        torch.save({"model": state}, path)
    elif content == "a list":
        torch.save([torch.zeros(2), torch.zeros(3)], path)
    else:
        _pickle_bomb(path, tmp_path / "code-ran")
    assert main(["evaluate", "-e", str(spec), f"evaluate.checkpoint={path}"]) == 1
    assert "bad.pth" in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "code-ran").exists()


def test_resuming_from_another_model_types_checkpoint_names_the_type(tiny_spec, tmp_path, capsys):
    spec = tiny_spec(num_train=32, train={"num_epochs": 1, "precision": "fp32"})
    assert main(["train", "-e", str(spec)]) == 0
    latest = tmp_path / "results" / "train" / "clip_latest.pth"
    other = f"results_dir={tmp_path / 'other'}"
    assert main(["train", "-e", str(spec), other, "model.type=tiny-siglip2",
                 f"train.resume_training_checkpoint_path={latest}"]) == 1  # fmt: skip
    line = _error_line(capsys.readouterr().err)
    assert "model.type=tiny-clip" in line and "the spec says tiny-siglip2" in line

    # a checkpoint without RNG states still resumes, with a warning that the run is not an exact continuation
    checkpoint = torch.load(latest, weights_only=True)
    del checkpoint["rng"]
    checkpoint["epoch"] = 0  # so that there is an epoch left to train
    no_rng = tmp_path / "no_rng.pth"
    torch.save(checkpoint, no_rng)
    args = [f"results_dir={tmp_path / 'third'}", f"train.resume_training_checkpoint_path={no_rng}"]
    assert main(["train", "-e", str(spec), *args]) == 0
