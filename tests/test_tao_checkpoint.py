"""TAO-trained checkpoints load wherever a checkpoint is taken.

The files are written by PyTorch Lightning itself, from a LightningModule laid out as TAO 7.0.1's
``CLIPPlModel`` is (``multimodal/clip/model/pl_clip_model.py`` and ``model/adapters/``): the module keeps
TAO's adapter as ``self.model``, which holds its own ``logit_scale``/``logit_bias`` and the library model as
``backbone.inner`` (transformers SigLIP) or ``backbone.model`` (open_clip CLIP), beside an ``nn.Identity``
head. Checkpoints are saved with TAO's ``ModelCheckpoint`` settings (``.pth``, ``model_{epoch:03d}_{step:05d}``,
``clip_latest`` link). Embeddings are compared with the libraries' own forward passes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clip_tao.cli import main
from clip_tao.config import load_experiment
from clip_tao.engine.model_setup import build_model
from clip_tao.models import create_model

pl = pytest.importorskip("pytorch_lightning")

TAO_SCALE, TAO_BIAS = 1.2345, -7.5  # the adapter's trained values: they, not the backbone's, must load


class _Backbone(nn.Module):
    def __init__(self, attribute: str, library_model: nn.Module):
        super().__init__()
        setattr(self, attribute, library_model)
        self.head = nn.Identity()


class _Adapter(nn.Module):
    def __init__(self, attribute: str, library_model: nn.Module):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(TAO_SCALE))
        self.logit_bias = nn.Parameter(torch.tensor(TAO_BIAS))
        self.backbone = _Backbone(attribute, library_model)


class _TaoLikeModule(pl.LightningModule):
    def __init__(self, attribute: str, library_model: nn.Module):
        super().__init__()
        self.model = _Adapter(attribute, library_model)

    def training_step(self, batch):
        # No update to the weights (lr 0): the checkpoint holds exactly the values set above.
        return sum(p.sum() for p in self.parameters()) * 0.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def write_tao_checkpoint(folder: Path, attribute: str, library_model: nn.Module, module_class=None) -> Path:
    from pytorch_lightning.callbacks import ModelCheckpoint

    module = (module_class or _TaoLikeModule)(attribute, library_model)
    # TAO's TAOLightningModule.configure_callbacks settings.
    ModelCheckpoint.FILE_EXTENSION = ".pth"
    ModelCheckpoint.CHECKPOINT_EQUALS_CHAR = "_"
    ModelCheckpoint.CHECKPOINT_NAME_LAST = "clip_latest"
    callback = ModelCheckpoint(
        every_n_epochs=1, dirpath=str(folder), save_on_train_epoch_end=True, monitor=None, save_top_k=-1,
        save_last="link", filename="model_{epoch:03d}_{step:05d}", enable_version_counter=False,
    )  # fmt: skip
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(1, 1)), batch_size=1)
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, callbacks=[callback], enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, data)
    path = folder / "model_epoch_000_step_00001.pth"
    assert path.is_file() and (folder / "clip_latest.pth").exists()
    return path


def _library_model(model_type: str, seed: int) -> tuple[str, nn.Module]:
    """A tiny model of the type with weights of its own (not the type's fixed initialisation)."""
    model = create_model(model_type, pretrained=False)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return ("inner" if model_type == "tiny-siglip2" else "model"), model.model


def _reference_embeddings(model_type: str, library_model: nn.Module, pixels, ids):
    """The library's own forward pass (transformers SiglipModel / open_clip CLIP)."""
    with torch.no_grad():
        if model_type == "tiny-siglip2":
            image = library_model.vision_model(pixel_values=pixels).pooler_output
            text = library_model.text_model(input_ids=ids).pooler_output
            return F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        return library_model.encode_image(pixels, normalize=True), library_model.encode_text(ids, normalize=True)


@pytest.mark.parametrize("model_type", ["tiny-siglip2", "tiny-clip"])
def test_tao_lightning_checkpoint_loads_in_every_task(tiny_spec, tmp_path, model_type):
    attribute, library_model = _library_model(model_type, seed=3)
    tao_file = write_tao_checkpoint(tmp_path / "tao", attribute, library_model)
    spec = tiny_spec(model_type)
    cfg = load_experiment(spec)

    model = build_model(cfg, str(tao_file)).eval()
    assert model.logit_scale.item() == pytest.approx(TAO_SCALE) and model.logit_bias.item() == pytest.approx(TAO_BIAS)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(3, 3, model.image_size, model.image_size, generator=g)
    ids = model.tokenizer(["a red square", "a blue square on green", "x"])
    want = _reference_embeddings(model_type, library_model.eval(), pixels, ids)
    with torch.no_grad():
        got = model.encode_image(pixels), model.encode_text(ids)
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= 1e-5

    quiet = "wandb.enable=false"
    assert main(["evaluate", "-e", str(spec), quiet, f"evaluate.checkpoint={tao_file}"]) == 0
    if model_type == "tiny-clip":
        return  # the other tasks take checkpoints through the same loader; once (SigLIP2) is enough
    images = f"inference.datasets=[{{image_dir: {tmp_path / 'data' / 'val'}}}]"
    latest = f"inference.checkpoint={tmp_path / 'tao' / 'clip_latest.pth'}"  # TAO's link to the newest file
    assert main(["inference", "-e", str(spec), quiet, images, latest]) == 0
    onnx = [f"export.checkpoint={tao_file}", f"export.onnx_file={tmp_path / 'export' / 'tao.onnx'}"]
    assert main(["export", "-e", str(spec), quiet, *onnx]) == 0
    start = ["train", "-e", str(spec), quiet, "train.num_epochs=1", f"train.pretrained_model_path={tao_file}"]
    assert main(start) == 0


def test_foreign_lightning_files_are_one_line(tiny_spec, tmp_path, capsys):
    spec = tiny_spec("tiny-siglip2")
    # A TAO open_clip (NV-CLIP) checkpoint given to a SigLIP2 type.
    attribute, library_model = _library_model("tiny-clip", seed=1)
    openclip_file = write_tao_checkpoint(tmp_path / "oc", attribute, library_model)
    assert main(["evaluate", "-e", str(spec), f"evaluate.checkpoint={openclip_file}"]) == 1
    err = capsys.readouterr().err.strip()
    assert "holds an open_clip CLIP model (TAO keys model.backbone.model.*)" in err and len(err.splitlines()) == 1

    # A Lightning checkpoint of another TAO task (a classifier: no logit scale).
    other = _TaoLikeModule("inner", nn.Linear(4, 2))
    del other.model.logit_scale
    other_file = tmp_path / "classifier.pth"
    torch.save({"pytorch-lightning_version": pl.__version__, "state_dict": other.state_dict(), "epoch": 0}, other_file)
    assert main(["evaluate", "-e", str(spec), f"evaluate.checkpoint={other_file}"]) == 1
    err = capsys.readouterr().err.strip()
    assert "is a Lightning checkpoint but not of TAO's CLIP task" in err and len(err.splitlines()) == 1


def test_tao_radio_checkpoint_maps_onto_the_radio_family(tmp_path):
    """``model.radio_model.*`` is RADIO's ``RADIOModel`` state (the layout RADIO's hf_hub.py also writes, here
    from the test assets' writer of it) plus the SigLIP adaptor's text tower: it loads into our Radio-CLIP
    model exactly as the same weights do from RADIO's own torch.hub file."""
    from safetensors.torch import load_file

    from clip_tao.engine.weights import load_weights
    from tests.family_assets import (
        make_gemma_tokenizer,
        make_radio_checkpoint,
        make_radio_hf_folder,
        make_siglip_folder,
    )

    make_gemma_tokenizer(tmp_path / "gemma")
    make_siglip_folder(tmp_path / "siglip", tmp_path / "gemma")
    siglip_index, name = 1, "siglip2-g"
    start = make_radio_checkpoint(tmp_path / "start.pth.tar", {siglip_index: 32}, seed=3)
    tuned = make_radio_checkpoint(tmp_path / "tuned.pth.tar", {siglip_index: 32}, seed=5)
    assert any(not torch.equal(start[k], tuned[k]) for k in tuned if k.startswith("base_model.blocks.0.attn"))
    make_radio_hf_folder(tmp_path / "hf", tuned, [name])

    def build(path):
        text = str(tmp_path / "siglip")
        return create_model("c-radio_v3-b", pretrained_path=str(path), adaptor_name="siglip", text_pretrained_path=text)

    want = build(tmp_path / "tuned.pth.tar").eval()
    with torch.no_grad():
        for p in want.text.parameters():
            p.add_(0.01)  # the "trained" text tower differs from the start
    tao_state = {"model.logit_scale": torch.tensor(TAO_SCALE), "model.logit_bias": torch.tensor(TAO_BIAS)}
    tao_state.update({f"model.{k}": v for k, v in load_file(tmp_path / "hf" / "model.safetensors").items()})
    for key, value in want.text.state_dict().items():  # our text.model is the teacher's SiglipTextModel
        inner = key.removeprefix("model.").removeprefix("text_model.")  # RADIO keeps its text transformer
        tao_state[f"model.radio_model.adaptors.{name}.text_model.{inner}"] = value
    tao_file = tmp_path / "tao_radio.pth"
    torch.save({"pytorch-lightning_version": pl.__version__, "state_dict": tao_state, "epoch": 0}, tao_file)

    model = build(tmp_path / "start.pth.tar")
    load_weights(model, str(tao_file))
    model.eval()
    assert model.logit_scale.item() == pytest.approx(TAO_SCALE)
    pixels = torch.randn(2, 3, 64, 64)
    ids = model.tokenizer(["a red square", "a cat"])
    with torch.no_grad():
        assert (model.encode_image(pixels) - want.encode_image(pixels)).abs().max() <= 1e-5
        assert (model.encode_text(ids) - want.encode_text(ids)).abs().max() <= 1e-5


def test_tao_radio_checkpoint_maps_the_clip_adaptors_open_clip_text_tower(tmp_path):
    """The ``clip`` adaptor is RADIO's ``OpenCLIP_RADIO`` (radio/open_clip_adaptor.py): the teacher's open_clip
    ``CLIP`` as ``oc_model`` with its image tower set to None, so TAO's file holds its text tower under
    ``adaptors.clip.oc_model.*`` (and again under ``model.adaptor.*``, TAO's second name for the adaptor). The
    tuned text tower loads: our embeddings equal that open_clip model's ``encode_text``, which TAO calls."""
    from open_clip.model import CLIP
    from safetensors.torch import load_file

    from clip_tao.engine.weights import load_weights
    from clip_tao.errors import ModelError
    from tests.family_assets import TINY_NVCLIP, make_openclip_folder, make_radio_checkpoint, make_radio_hf_folder

    text_cfg = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    clip_cfg = {**TINY_NVCLIP, "embed_dim": 24, "text_cfg": text_cfg}
    make_openclip_folder(tmp_path / "dfn", clip_cfg, None)  # the start model's text tower
    clip_index, name = 0, "clip"
    make_radio_checkpoint(tmp_path / "start.pth.tar", {clip_index: 24}, seed=3)
    tuned = make_radio_checkpoint(tmp_path / "tuned.pth.tar", {clip_index: 24}, seed=5)
    make_radio_hf_folder(tmp_path / "hf", tuned, [name])
    torch.manual_seed(11)  # the tuned text tower: other weights than the start's
    oc_model = CLIP(**clip_cfg).eval()
    oc_model.visual = None  # as OpenCLIP_RADIO.__init__ unloads it
    tao_state = {"model.logit_scale": torch.tensor(TAO_SCALE), "model.logit_bias": torch.tensor(TAO_BIAS)}
    tao_state.update({f"model.{k}": v for k, v in load_file(tmp_path / "hf" / "model.safetensors").items()})
    tao_state.update({f"model.radio_model.adaptors.{name}.oc_model.{k}": v for k, v in oc_model.state_dict().items()})
    prefix = f"model.radio_model.adaptors.{name}."
    tao_state.update(
        {f"model.adaptor.{k[len(prefix) :]}": v for k, v in list(tao_state.items()) if k.startswith(prefix)}
    )
    tao_file = tmp_path / "tao_radio_clip.pth"
    torch.save({"pytorch-lightning_version": pl.__version__, "state_dict": tao_state, "epoch": 0}, tao_file)

    def build(path):
        text = str(tmp_path / "dfn")
        return create_model("c-radio_v3-b", pretrained_path=str(path), adaptor_name="clip", text_pretrained_path=text)

    model = build(tmp_path / "start.pth.tar")
    ids = model.tokenizer(["a red square", "a cat on a mat", "x"])
    with torch.no_grad():
        want_text = oc_model.encode_text(ids, normalize=True)
        assert (model.eval().encode_text(ids) - want_text).abs().max() > 1e-3  # the start differs
    load_weights(model, str(tao_file))
    model.eval()
    assert model.logit_scale.item() == pytest.approx(TAO_SCALE)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (model.encode_text(ids) - want_text).abs().max() <= 1e-5
        want_image = build(tmp_path / "tuned.pth.tar").eval().encode_image(pixels)
        assert (model.encode_image(pixels) - want_image).abs().max() <= 1e-5

    # A text tensor of another shape (a file of another teacher) is one line naming the file and the key.
    tao_state[f"{prefix}oc_model.ln_final.weight"] = torch.ones(8)
    torch.save({"pytorch-lightning_version": pl.__version__, "state_dict": tao_state}, tmp_path / "other.pth")
    with pytest.raises(ModelError, match=r"other\.pth.*oc_model\.ln_final\.weight has shape \[8\]") as error:
        load_weights(model, str(tmp_path / "other.pth"))
    assert "\n" not in str(error.value)


@pytest.mark.skipif(
    not os.environ.get("CLIP_TAO_RADIO_REPO"), reason="set CLIP_TAO_RADIO_REPO to a clone of NVlabs/RADIO"
)
@pytest.mark.filterwarnings("ignore")
def test_tao_radio_checkpoint_from_radios_own_hub_model(tmp_path):
    """The ``radio_model`` TAO saves is RADIO's ``hubconf.radio_model``: its own state dict (backbone and input
    conditioner), with the adaptor's head under ``adaptors.<name>.head_mlp``, loads into our model and gives
    RADIO's own summary through that head (needs a clone of NVlabs/RADIO and einops)."""
    import sys

    from clip_tao.engine.weights import load_weights
    from tests.family_assets import make_gemma_tokenizer, make_radio_checkpoint, make_siglip_folder

    sys.path.insert(0, os.environ["CLIP_TAO_RADIO_REPO"])
    try:
        import hubconf
    finally:
        sys.path.pop(0)
    make_gemma_tokenizer(tmp_path / "gemma")
    make_siglip_folder(tmp_path / "siglip", tmp_path / "gemma")
    make_radio_checkpoint(tmp_path / "start.pth.tar", {1: 32}, seed=3)
    tuned = make_radio_checkpoint(tmp_path / "tuned.pth.tar", {1: 32}, seed=5)
    radio = hubconf.radio_model(str(tmp_path / "tuned.pth.tar")).eval()  # no adaptor: that needs the hub
    tao_state = {"model.logit_scale": torch.tensor(TAO_SCALE), "model.logit_bias": torch.tensor(TAO_BIAS)}
    tao_state.update({f"model.radio_model.{k}": v for k, v in radio.state_dict().items()})
    head = {k[len("_heads.1.") :]: v for k, v in tuned.items() if k.startswith("_heads.1.")}
    tao_state.update({f"model.radio_model.adaptors.siglip2-g.head_mlp.{k}": v for k, v in head.items()})
    tao_file = tmp_path / "tao_radio.pth"
    torch.save({"pytorch-lightning_version": pl.__version__, "state_dict": tao_state}, tao_file)
    text = str(tmp_path / "siglip")
    model = create_model(
        "c-radio_v3-b",
        pretrained_path=str(tmp_path / "start.pth.tar"),
        adaptor_name="siglip",
        text_pretrained_path=text,
    )
    load_weights(model, str(tao_file))
    model.eval()
    mean = torch.tensor(model.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.preprocess.std).view(1, 3, 1, 1)
    raw = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        features = radio.model.forward_features(radio.input_conditioner(raw))
        want = model.visual.head(features[:, model.visual.token_slot].float())
        torch.testing.assert_close(model.image_features((raw - mean) / std), want, atol=1e-5, rtol=1e-5)


# -- TAO 7.3: source-owned calibration, LoRA layers --------------------------------------------------------------
TAO73_SCALE, TAO73_BIAS = 1.75, -6.25


class _TaoLoRALinear(nn.Module):
    """Laid out as TAO 7.3's ``LoRALinear`` (``multimodal/clip/model/lora.py``): the frozen layer as ``original``,
    ``lora_A`` [r, in], ``lora_B`` [out, r] and the float32 buffer ``scaling`` = alpha / r (not saved by its first
    version: ``persist_scaling=False``). Output: ``original(x) + (x A^T B^T) * scaling`` (dropout off: eval)."""

    def __init__(self, original: nn.Linear, rank: int, alpha: int, generator, persist_scaling: bool = True):
        super().__init__()
        self.original = original
        self.register_buffer("scaling", torch.tensor(alpha / rank, dtype=torch.float32), persistent=persist_scaling)
        # Trained adapters: both matrices non-zero (a fresh B is zero, which would hide a wrong merge).
        self.lora_A = nn.Parameter(torch.randn(rank, original.in_features, generator=generator) * 0.2)
        self.lora_B = nn.Parameter(torch.randn(original.out_features, rank, generator=generator) * 0.2)

    def forward(self, x):
        return self.original(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling


class _Adapter73(nn.Module):
    """TAO 7.3's adapter: no logit parameters of its own, the source model (``backbone.inner``) owns them."""

    def __init__(self, attribute: str, library_model: nn.Module):
        super().__init__()
        self.backbone = _Backbone(attribute, library_model)


class _Tao73Module(_TaoLikeModule):
    def __init__(self, attribute: str, library_model: nn.Module):
        pl.LightningModule.__init__(self)
        self.model = _Adapter73(attribute, library_model)


def _tao73_lora_siglip(persist_scaling: bool) -> nn.Module:
    """A tiny SigLIP2 with TAO's LoRA layers in the last block of each tower (rank 4, alpha 8: scaling 2)."""
    _, library_model = _library_model("tiny-siglip2", seed=5)
    with torch.no_grad():
        library_model.logit_scale.fill_(TAO73_SCALE)
        library_model.logit_bias.fill_(TAO73_BIAS)
    g = torch.Generator().manual_seed(11)
    for tower in (library_model.vision_model, library_model.text_model):
        attention = tower.encoder.layers[-1].self_attn
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(attention, name, _TaoLoRALinear(getattr(attention, name), 4, 8, g, persist_scaling))
    return library_model


def _write_tao73(folder: Path, library_model: nn.Module) -> Path:
    return write_tao_checkpoint(folder, "inner", library_model, _Tao73Module)


LORA73 = {"mode": "lora", "rank": 4, "alpha": 8, "num_last_blocks": 1}


@pytest.mark.parametrize("persist_scaling", [True, False])
def test_tao_73_lora_checkpoint_loads_merged(tiny_spec, tmp_path, persist_scaling, caplog):
    library_model = _tao73_lora_siglip(persist_scaling)
    tao_file = _write_tao73(tmp_path / "tao", library_model)
    state = torch.load(tao_file, weights_only=True)["state_dict"]
    layer = "model.backbone.inner.vision_model.encoder.layers.1.self_attn.q_proj"
    assert {f"{layer}.original.weight", f"{layer}.original.bias", f"{layer}.lora_A", f"{layer}.lora_B"} <= set(state)
    assert (f"{layer}.scaling" in state) == persist_scaling and "model.logit_scale" not in state
    spec = tiny_spec("tiny-siglip2", peft={"enabled": True, "vision": LORA73, "text": LORA73})
    cfg = load_experiment(spec)

    model = build_model(cfg, str(tao_file)).eval()
    assert not any("lora" in k or "original" in k for k in model.state_dict())  # merged: the plain model
    assert model.logit_scale.item() == pytest.approx(TAO73_SCALE) and model.logit_bias.item() == pytest.approx(
        TAO73_BIAS
    )
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(3, 3, model.image_size, model.image_size, generator=g)
    ids = model.tokenizer(["a red square", "a blue square on green", "x"])
    want = _reference_embeddings("tiny-siglip2", library_model.eval(), pixels, ids)  # TAO's unmerged layers
    with torch.no_grad():
        got = model.encode_image(pixels), model.encode_text(ids)
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= 1e-5
    warned = any("without scaling buffers" in r.getMessage() for r in caplog.records)
    assert warned == (not persist_scaling)
    if not persist_scaling:
        return
    quiet = "wandb.enable=false"
    assert main(["evaluate", "-e", str(spec), quiet, f"evaluate.checkpoint={tao_file}"]) == 0
    images = f"inference.datasets=[{{image_dir: {tmp_path / 'data' / 'val'}}}]"
    assert main(["inference", "-e", str(spec), quiet, images, f"inference.checkpoint={tao_file}"]) == 0
    onnx_file = tmp_path / "export" / "tao73.onnx"
    assert (
        main(["export", "-e", str(spec), quiet, f"export.checkpoint={tao_file}", f"export.onnx_file={onnx_file}"]) == 0
    )
    import onnx

    graph = onnx.load(str(onnx_file)).graph
    assert not any("lora" in n.lower() for n in [i.name for i in graph.initializer] + [n.name for n in graph.node])


def test_tao_73_lora_checkpoint_without_scaling_needs_the_training_peft_section(tiny_spec, tmp_path, capsys):
    tao_file = _write_tao73(tmp_path / "tao", _tao73_lora_siglip(persist_scaling=False))
    spec = tiny_spec("tiny-siglip2")
    capsys.readouterr()
    assert main(["evaluate", "-e", str(spec), "wandb.enable=false", f"evaluate.checkpoint={tao_file}"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "is a rank-4 LoRA layer without its scaling" in err and "give this task the training spec's peft" in err


def test_checkpoint_from_before_taos_calibration_change_loads(tiny_spec, tmp_path, caplog):
    """TAO 7.3 refuses 7.0.1-layout files (an adapter-owned [1]-shaped logit_scale beside the source's, adaptor.*
    keys); they load here: the adapter's values, as 7.0.1's forward used them, with both values in a warning."""
    attribute, library_model = _library_model("tiny-siglip2", seed=3)
    tao_file = write_tao_checkpoint(tmp_path / "tao", attribute, library_model)
    checkpoint = torch.load(tao_file, weights_only=True)
    state = checkpoint["state_dict"]
    state["model.logit_scale"] = state["model.logit_scale"].reshape(1)  # the older [1] shape
    state["model.adaptor.proj.weight"] = torch.zeros(2, 2)
    torch.save(checkpoint, tao_file)
    model = build_model(load_experiment(tiny_spec("tiny-siglip2")), str(tao_file))
    assert model.logit_scale.item() == pytest.approx(TAO_SCALE) and model.logit_bias.item() == pytest.approx(TAO_BIAS)
    warning = next(r.getMessage() for r in caplog.records if "calibration change" in r.getMessage())
    inner = float(library_model.logit_scale.flatten()[0])
    assert f"model.logit_scale={TAO_SCALE:.6g} (used" in warning and f"logit_scale={inner:.6g} (left out)" in warning


def test_logit_scale_ceiling_keeps_a_pretrained_scale_above_ln_100(tiny_spec, tmp_path):
    """TAO 7.3 clamps the raw scale to [0, max(ln 100, its starting value)] after every step."""
    import math

    model = create_model("tiny-clip", pretrained=False)
    with torch.no_grad():
        model.logit_scale.fill_(5.0)
    ceiling = model.logit_scale_ceiling()
    assert ceiling == pytest.approx(5.0)
    for raw, want in ((6.0, 5.0), (-1.0, 0.0), (4.9, 4.9)):
        with torch.no_grad():
            model.logit_scale.fill_(raw)
        model.clamp_logit_scale(ceiling)
        assert model.logit_scale.item() == pytest.approx(want)
    spec = tiny_spec("tiny-clip", num_train=16, num_val=8, train={"num_epochs": 1})
    run = ["train", "-e", str(spec), "wandb.enable=false", "dataset.train.batch_size=8", "model.init_logit_scale=5.0"]
    assert main(run) == 0
    from clip_tao.engine.checkpoint import load_checkpoint

    saved = load_checkpoint(str(tmp_path / "results" / "train" / "clip_latest.pth"))["model"]
    assert math.log(100) < float(saved["model.logit_scale"]) <= 5.0
