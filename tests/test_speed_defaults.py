"""What makes GPU training fast, checked where it can be on a CPU: every family attends with PyTorch's
fused attention (SDPA), bf16 autocast gives the fp32 loss and gradients within bf16's precision, the fused
AdamW chosen on CUDA updates as the default one, and a step need not wait for the device."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from clip_tao.config.schema import OptimConfig
from clip_tao.engine.device import resolve_precision
from clip_tao.engine.distributed import ContrastiveForward
from clip_tao.engine.optim import build_optimizer, parameter_groups
from clip_tao.engine.step import contrastive_backward
from clip_tao.losses import ContrastiveLoss
from clip_tao.models import create_model
from tests.family_assets import make_gemma_tokenizer, make_radio_checkpoint, make_siglip_folder

SDPA_OPS = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
            "_scaled_dot_product_flash_attention", "scaled_dot_product_attention")  # fmt: skip


class _OpNames(TorchDispatchMode):
    """The ATen operators a piece of code runs (what the device actually executes)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _sdpa_calls(fn, *args) -> int:
    with torch.no_grad(), _OpNames() as ops:
        fn(*args)
    return sum(name in SDPA_OPS for name in ops.names)


def _radio_model(tmp_path):
    make_gemma_tokenizer(tmp_path / "gemma")
    make_siglip_folder(tmp_path / "siglip", tmp_path / "gemma")
    make_radio_checkpoint(tmp_path / "c-radio.pth.tar", {1: 32})
    return create_model("c-radio_v3-b", pretrained_path=str(tmp_path / "c-radio.pth.tar"), adaptor_name="siglip",
                        text_pretrained_path=str(tmp_path / "siglip"))  # fmt: skip


def test_every_family_attends_with_sdpa(tmp_path):
    """open_clip's attention, transformers' SigLIP (attn_implementation sdpa) and timm's ViT (fused_attn)."""
    for model in (create_model("tiny-clip"), create_model("tiny-siglip2"), _radio_model(tmp_path)):
        size = model.image_size
        pixels = torch.randn(2, 3, size, size)
        ids = model.tokenizer(["a red square", "a blue circle"])
        assert _sdpa_calls(model.encode_image, pixels) >= 1, f"{model.model_type} image tower"
        assert _sdpa_calls(model.encode_text, ids) >= 1, f"{model.model_type} text tower"


def _loss_and_grads(model_type: str, precision: str):
    torch.manual_seed(0)
    model = create_model(model_type, pretrained=False)
    batch = [(torch.randn(8, 3, model.image_size, model.image_size),
              model.tokenizer([f"a photo of {i} red squares" for i in range(8)]))]  # fmt: skip
    device = torch.device("cpu")
    loss = contrastive_backward(ContrastiveForward(model), ContrastiveLoss("siglip"), batch,
                                resolve_precision(precision, device), device)  # fmt: skip
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return loss, grads


def test_bf16_autocast_matches_fp32_within_bf16_precision():
    for model_type in ("tiny-clip", "tiny-siglip2"):
        loss32, grads32 = _loss_and_grads(model_type, "fp32")
        loss16, grads16 = _loss_and_grads(model_type, "bf16")
        assert abs(loss16 - loss32) <= 2e-2 * abs(loss32), model_type  # bf16: 8 bits of mantissa
        assert torch.nn.functional.cosine_similarity(grads16, grads32, dim=0) > 0.99, model_type
        assert (grads16 - grads32).norm() <= 0.1 * grads32.norm(), model_type
        assert not torch.equal(grads16, grads32)  # autocast did run in bf16


def test_fused_adamw_updates_as_the_per_tensor_loop():
    """The optimiser is AdamW(fused=True) on CPU and CUDA parameters: it updates as torch's per-tensor loop."""
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = create_model("tiny-clip", pretrained=False)
        optim = OptimConfig(weight_decay=0.1)
        optimizer = build_optimizer(model, optim)
        assert optimizer.defaults.get("fused")  # plain CPU parameters: the fused kernel
        if not fused:
            optimizer = torch.optim.AdamW(parameter_groups(model, optim), betas=tuple(optim.betas), eps=optim.eps,
                                          foreach=False)  # fmt: skip
        for step in range(3):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step)) * 1e-2
            optimizer.step()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_a_step_can_leave_the_loss_on_the_device():
    torch.manual_seed(0)
    model = create_model("tiny-clip", pretrained=False)
    batch = [(torch.randn(4, 3, 64, 64), model.tokenizer(["a", "b", "c", "d"]))]
    device = torch.device("cpu")
    args = (ContrastiveForward(model), ContrastiveLoss("clip"), batch, resolve_precision("fp32", device), device)
    synced = contrastive_backward(*args)
    unsynced = contrastive_backward(*args, sync=False)
    assert isinstance(synced, float) and isinstance(unsynced, torch.Tensor) and not unsynced.requires_grad
    assert unsynced.item() == synced


def test_train_compile_trains_as_eager_and_saves_the_plain_names(tiny_spec, tmp_path):
    """``train.compile: true`` runs the step through torch.compile (Inductor, here on the CPU); losses and
    weights follow the eager run, and checkpoints keep the plain model's parameter names."""
    import torch._dynamo

    from clip_tao.cli import main

    spec = tiny_spec(train={"num_epochs": 1})
    runs = {}
    for compile_ in (False, True):
        results = tmp_path / f"compile_{compile_}"
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        assert main(["train", "-e", str(spec), f"results_dir={results}", f"train.compile={compile_}"]) == 0
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert (graphs > 0) == compile_, f"compile={compile_}: {graphs} graphs compiled"
        runs[compile_] = torch.load(results / "train" / "clip_latest.pth", weights_only=True)
    eager, compiled = runs[False], runs[True]
    assert list(compiled["model"]) == list(eager["model"])  # no "_orig_mod." prefixes
    loss = {k: run["history"][-1]["train_loss"] for k, run in runs.items()}
    # Inductor may sum in another order: a few float32 roundings apart after 3 AdamW steps, no more.
    assert abs(loss[True] - loss[False]) <= 1e-3 * abs(loss[False]), loss
    for name, value in eager["model"].items():
        torch.testing.assert_close(compiled["model"][name], value, rtol=1e-3, atol=1e-3, msg=name)
