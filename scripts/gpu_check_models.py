#!/usr/bin/env python
"""Real-size forward+backward check of the big families: throughput and peak memory, no downloads.

Builds ``siglip2-so400m-patch16-256`` and ``c-radio_v3-b`` (siglip adaptor) from the package's configs with
random weights (no tokenizer needed: random token ids), then times training steps — forward, sigmoid
loss, backward, AdamW — under bf16 autocast with fp32 master weights, as ``train.precision: bf16`` does.

    python scripts/gpu_check_models.py                 # CUDA, batch 32, prints samples/s and peak memory
    python scripts/gpu_check_models.py --cpu --small   # a 2-layer version on the CPU (checks the script)

Prints one table and one JSON line per model. Runs in well under 5 minutes on one H100.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clip_tao.losses import ContrastiveLoss  # noqa: E402
from clip_tao.models.base import Preprocess  # noqa: E402
from clip_tao.models.registry import get_model_info  # noqa: E402

MODELS = ("siglip2-so400m-patch16-256", "c-radio_v3-b")


def build_siglip2(name: str, small: bool):
    from clip_tao.models.siglip_family import SiglipClipModel, build_siglip_module

    info = copy.deepcopy(get_model_info(name))
    if small:
        for tower in ("text_config", "vision_config"):
            info.config[tower]["num_hidden_layers"] = 2
        # Gemma's special ids (pad 0, eos 1, bos 2) so the shrunken vocabulary still holds them.
        info.config["text_config"].update(vocab_size=1000, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = SiglipClipModel(name, build_siglip_module(info), None, Preprocess(info.image_size))
    return model, info.image_size, info.config["text_config"]["vocab_size"], info.context_length


def build_radio(name: str, small: bool):
    """timm's C-RADIO backbone + siglip adaptor head + the SigLIP2 teacher's text tower, at the registry's sizes."""
    from transformers import SiglipTextConfig, SiglipTextModel

    from clip_tao.models.radio_adaptors import resolve_adaptor
    from clip_tao.models.radio_backbone import create_backbone
    from clip_tao.models.radio_family import RadioClipModel, RadioImageTower
    from clip_tao.models.radio_heads import head_from_config
    from clip_tao.models.text_towers import SiglipTextTower

    cfg = copy.deepcopy(get_model_info(name).config)
    text_cfg = cfg["text_configs"]["siglip2"]
    if small:
        text_cfg.update(num_hidden_layers=2, vocab_size=1000, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    adaptor = resolve_adaptor("siglip", cfg["args"]["teachers"], cfg["tao_adaptor"], True, name)
    backbone = create_backbone(cfg["timm_model"], {"depth": 2} if small else None)
    head = head_from_config("v2", cfg["heads"]["siglip2"])
    visual = RadioImageTower(backbone, head, adaptor.token_slot, 16)
    text = SiglipTextTower(SiglipTextModel(SiglipTextConfig(**text_cfg)))
    image_size = 256 if small else get_model_info(name).image_size
    model = RadioClipModel(name, visual, text, None, Preprocess(image_size), head.output_dim)
    return model, image_size, text_cfg["vocab_size"], 64


def run(name: str, device: torch.device, batch: int, steps: int, warmup: int, small: bool, grad_ckpt: bool) -> dict:
    builder = build_radio if name.startswith("c-radio") else build_siglip2
    torch.manual_seed(0)
    start = time.perf_counter()
    with device:  # initialise on the device: much faster than on the host for a billion parameters
        model, image_size, vocab, context = builder(name, small)
    build_s = time.perf_counter() - start
    model.init_logits(2.3026, -10.0)
    model.set_grad_checkpointing(grad_ckpt)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    loss_fn = ContrastiveLoss("siglip")
    pixels = torch.randn(batch, 3, image_size, image_size, device=device)
    ids = torch.randint(2, vocab, (batch, context), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def step() -> float:
        with autocast:
            image, text = model(pixels, ids)
            loss = loss_fn(image.float(), text.float(), model.logit_scale, model.logit_bias)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # .item() synchronises, so the clock below measures finished work

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    losses = [step() for _ in range(steps)]
    elapsed = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.vision_parameters())
    result = {
        "model": name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "precision": "bf16 autocast, fp32 weights, AdamW",
        "image_size": image_size,
        "batch": batch,
        "params_M": round(params / 1e6, 1),
        "vision_params_M": round(vision / 1e6, 1),
        "grad_checkpointing": grad_ckpt,
        "build_s": round(build_s, 1),
        "step_s": round(elapsed / steps, 4),
        "samples_per_s": round(batch * steps / elapsed, 1),
        "peak_memory_GiB": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "final_loss": round(losses[-1], 4),
        "finite": all(torch.isfinite(torch.tensor(losses)).tolist()),
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (default: CUDA)")
    parser.add_argument("--small", action="store_true", help="2-layer towers, batch 4, 2 steps: checks the script")
    parser.add_argument("--batch", type=int, default=None, help="samples per step (default 32; 4 with --small)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 2 with --small)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 1 with --small)")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device: use --cpu (with --small) to check the script on a CPU")
    device = torch.device("cpu" if args.cpu else "cuda")
    batch = args.batch or (4 if args.small else 32)
    steps = args.steps or (2 if args.small else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.small else 3)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    print(f"torch {torch.__version__}, device {device}, batch {batch}, {steps} timed steps after {warmup} warm-up")
    results = []
    for name in args.models:
        result = run(name, device, batch, steps, warmup, args.small, args.grad_checkpointing)
        results.append(result)
        print(json.dumps(result))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the model died with run(): free its cache for the next one
    header = f"{'model':<28} {'params M':>9} {'image':>6} {'batch':>6} {'step s':>8} {'samples/s':>10} {'peak GiB':>9}"
    print("\n" + header)
    for r in results:
        peak = "-" if r["peak_memory_GiB"] is None else f"{r['peak_memory_GiB']:.2f}"
        print(
            f"{r['model']:<28} {r['params_M']:>9.1f} {r['image_size']:>6} {r['batch']:>6} "
            f"{r['step_s']:>8.3f} {r['samples_per_s']:>10.1f} {peak:>9}"
        )
    return 0 if all(r["finite"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
