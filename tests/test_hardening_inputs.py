"""Bad or unusual input gives one clear line (or the right result), never a traceback or a hang."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from importlib import metadata

import pytest

from clip_tao.cli import main
from clip_tao.config import load_experiment
from clip_tao.config.schema import DatasetEntry, WdsConfig
from clip_tao.data.custom import scan_custom_datasets
from clip_tao.errors import ConfigError, DataError
from clip_tao.models.hub_cli import download_command
from tests.conftest import REPO, make_dataset


def test_a_symlink_loop_in_image_dir_is_walked_once(tmp_path, caplog):
    images = make_dataset(tmp_path / "img", 4)
    os.symlink(images, images / "loop")  # a link back to the folder itself
    with caplog.at_level(logging.WARNING):
        samples, _ = scan_custom_datasets([DatasetEntry(str(images))], "dataset.val.datasets")
    assert len(samples) == 4
    assert "symbolic-link loop" in caplog.text


def test_a_symlink_loop_in_a_shard_folder_is_walked_once(tmp_path):
    from clip_tao.data.wds import list_shards

    root = tmp_path / "shards"
    root.mkdir()
    (root / "a.tar").write_bytes(b"")
    os.symlink(root, root / "again")
    urls = list_shards(WdsConfig(root_dir=str(root)), "dataset.train.wds")
    assert [s.url for s in urls] == [str(root / "a.tar")]


def test_a_non_utf8_image_list_is_one_line(tmp_path):
    images = make_dataset(tmp_path / "img", 2)
    listing = tmp_path / "list.txt"
    listing.write_bytes("img_000.jpg\nimg_\xe9001.jpg\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"image_list_file .*list.txt' is not UTF-8 text \(line 2\)"):
        scan_custom_datasets([DatasetEntry(str(images), image_list_file=str(listing))], "dataset.val.datasets")


def test_list_models_matches_a_word_and_explains_an_empty_result(capsys):
    assert main(["list-models", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "tiny-clip" in out and "tiny-siglip2" in out and "c-radio" not in out
    assert main(["list-models", "no-such-model"]) == 1
    assert "no model type matches 'no-such-model'" in capsys.readouterr().out
    assert main(["list-models", "tiny-c*"]) == 0  # a shell pattern still anchors at the start
    assert "tiny-siglip2" not in capsys.readouterr().out


def test_messages_name_the_download_command_that_is_installed():
    declared = {e.name for e in metadata.distribution("huggingface_hub").entry_points}
    command = download_command("google/siglip2-so400m-patch16-256")
    assert command.split()[0] in declared
    assert command.endswith("download google/siglip2-so400m-patch16-256")


def _spec(tmp_path, text: str):
    path = tmp_path / "spec.yaml"
    path.write_text(f"results_dir: {tmp_path / 'results'}\n{text}", encoding="utf-8")
    return path


def test_a_billion_laughs_spec_is_refused_at_once(tmp_path):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, 9):
        lines.append(f"a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * 9)}]")
    spec = _spec(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"expands through YAML aliases .* to more than 1,000,000 values"):
        load_experiment(spec)


def test_a_spec_with_a_few_aliases_still_loads(tmp_path):
    spec = _spec(tmp_path, "base: &lr 0.001\ntrain:\n  optim:\n    vision_lr: *lr\n    text_lr: *lr\n")
    with pytest.raises(ConfigError, match="unknown key base"):  # parsed to the end: only the extra key is wrong
        load_experiment(spec)
    cfg = load_experiment(_spec(tmp_path, "train:\n  optim: &o {vision_lr: 0.001}\n"))
    assert cfg.train.optim.vision_lr == 0.001


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.optim.betas=[2,3]", r"train.optim.betas\[0\]=2.0 must be <= 0.999999"),
        ("train.optim.betas=[0.9]", "train.optim.betas must hold 2 numbers"),
        ("train.optim.eps=-1", r"train.optim.eps=-1.0 must be > 0"),
        ("train.optim.weight_decay=-1", r"train.optim.weight_decay=-1.0 must be >= 0"),
        ("train.optim.vision_lr=nan", "train.optim.vision_lr=nan must be a finite number"),
        ("train.optim.text_lr=inf", "train.optim.text_lr=inf must be a finite number"),
        ("train.grad_clip_norm=nan", "train.grad_clip_norm=nan must be a finite number"),
        ("train.optim.vision_lr=" + "9" * 400, "train.optim.vision_lr has 400 digits"),
        ("model.image_size=" + "9" * 400, "model.image_size=<a 400-digit number> must be <= 65536"),
        ("train.seed=" + "9" * 400, "train.seed has 400 digits"),
        ("dataset.train.batch_size=1e20", "dataset.train.batch_size=100000000000000000000 must be <= 1048576"),
        ("evaluate.batch_size=0", "evaluate.batch_size=0 must be >= 1"),
    ],
)
def test_spec_values_out_of_range_are_one_line(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment(_spec(tmp_path, ""), [override])


def test_every_wrong_path_is_reported_before_any_model_is_built(tiny_spec, tmp_path, capsys, caplog):
    spec = tiny_spec()
    args = [
        "model.type=siglip2-so400m-patch16-256",  # weights from the hub: building would fetch (or retry) first
        f"+model.pretrained_path={tmp_path / 'no-weights'}",
        f"dataset.train.datasets=[{{image_dir: {tmp_path / 'no-train'}}}]",
        f"dataset.val.datasets=[{{image_dir: {tmp_path / 'data' / 'val'}, image_list_file: {tmp_path / 'x.txt'}}}]",
    ]
    started = time.monotonic()
    assert main(["train", "-e", str(spec), *args]) == 1
    assert time.monotonic() - started < 30  # no model was built, no hub was asked
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if line.startswith("clip-tao")]) == 1
    for key in (
        "model.pretrained_path",
        "dataset.train.datasets[0].image_dir",
        "dataset.val.datasets[0].image_list_file",
    ):
        assert key in err
    assert "siglip" not in caplog.text.lower()  # the model was never built
    status = (tmp_path / "results" / "train" / "status.json").read_text().splitlines()
    assert len(status) == 1 and '"FAILURE"' in status[0]  # the outcome for TAO's tools, and nothing else
    assert sorted(p.name for p in (tmp_path / "results" / "train").iterdir()) == ["status.json"]


def test_an_unreachable_hub_is_not_retried(tmp_path):
    """No network here: the hub check switches to the local cache at once, so the error comes without retries."""
    code = (
        "import logging, sys; from clip_tao.cli import _setup_logging; _setup_logging()\n"
        "from clip_tao.models.tokenizer import load_hf_tokenizer\n"
        "try:\n    load_hf_tokenizer('no-such-org/no-such-repo')\n"
        "except Exception as exc:\n    print(type(exc).__name__, exc, file=sys.stderr)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(PYTHONPATH=str(REPO), HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert time.monotonic() - started < 60
    assert "Retry" not in run.stderr
    assert "ModelError" in run.stderr and "download no-such-org/no-such-repo" in run.stderr
    assert run.stderr.count("cannot be reached") == 1
