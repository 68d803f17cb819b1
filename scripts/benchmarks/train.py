"""``train``: samples/s of clip-tao's training step on random inputs, against the bare forward+backward of the
same model (the floor clip-tao's step adds to), with the model FLOPs utilisation (MFU).

MFU: the FLOPs of one step as ``torch.utils.flop_counter.FlopCounterMode`` counts them (matrix products,
convolutions, attention), times the measured rate, over the device's dense peak for the precision (a table of
data-sheet peaks for common GPUs; on the CPU a measured large matrix product; ``--peak-tflops``).
"""

from __future__ import annotations

import time

from benchmarks.core import (
    build_random_model,
    count_flops,
    peak_rss_mb,
    peak_tflops,
    register_openclip_arch,
    utilisation,
)

NAME = "train"
HELP = "training samples/s"


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="tiny-clip")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--loss", default="siglip", choices=["siglip", "clip"])
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches a step (features cached, as training)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is present")
    parser.add_argument(
        "--openclip-arch", help="use one of open_clip's architectures instead, e.g. ViT-B-32 (random init)"
    )
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--no-fused", action="store_true", help="foreach AdamW instead of the fused one chosen on CUDA")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (as train.compile)")
    parser.add_argument("--no-fast-math", action="store_true", help="keep fp32 matrix products in full fp32 (no TF32)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak for the MFU (default: table / measured)")


def bench_train(args) -> dict:
    """clip-tao's own training step (the trainer's ``contrastive_backward``) against a bare forward+backward."""
    import torch

    from clip_tao.config.schema import OptimConfig
    from clip_tao.engine.device import enable_fast_matmul, resolve_precision
    from clip_tao.engine.distributed import ContrastiveForward
    from clip_tao.engine.optim import build_optimizer, parameter_groups
    from clip_tao.engine.step import contrastive_backward
    from clip_tao.losses import ContrastiveLoss

    if args.openclip_arch:
        args.model = register_openclip_arch(args.openclip_arch)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    precision = resolve_precision(args.precision, device)
    if not args.no_fast_math:
        enable_fast_matmul(device)
    model, token_ids = build_random_model(args.model, device)
    model = model.to(device)
    model.set_grad_checkpointing(args.grad_checkpointing)
    net = ContrastiveForward(model)
    size = model.image_size
    pixels = torch.randn(args.batch, 3, size, size, device=device)
    ids = token_ids(args.batch).to(device)
    micro = args.batch // args.accumulate
    parts = [(pixels[k : k + micro], ids[k : k + micro]) for k in range(0, args.batch, micro)]
    loss_fn = ContrastiveLoss(args.loss)
    optimizer = build_optimizer(model, OptimConfig())
    if args.no_fused:  # the optimiser before fused AdamW became the CUDA default
        optim = OptimConfig()
        optimizer = torch.optim.AdamW(parameter_groups(model, optim), betas=tuple(optim.betas), eps=optim.eps,
                                      foreach=True)  # fmt: skip
    scaler = torch.amp.GradScaler(device.type, enabled=precision.use_grad_scaler)

    def step(full: bool) -> None:
        if full:
            optimizer.zero_grad(set_to_none=True)
            contrastive_backward(net, loss_fn, parts, precision, device, scaler if scaler.is_enabled() else None)
            scaler.step(optimizer)
            scaler.update()
            model.clamp_logit_scale()
        else:
            with precision.autocast(device):
                image, text, scale, bias = net(pixels, ids)
                loss = loss_fn(image.float(), text.float(), scale, bias)
            loss.backward()

    def timed(full: bool) -> float:
        for _ in range(3):
            step(full)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step(full)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return args.batch * args.steps / (time.perf_counter() - start)

    flops = count_flops(lambda: step(True))  # counted in eager mode: compiled kernels are not seen
    if args.compile:
        net.compile()
    peak, peak_source = peak_tflops(device, precision.name, args.peak_tflops)
    rate, bare = timed(True), timed(False)
    return {
        "benchmark": "train",
        "model": args.model,
        "batch": args.batch,
        "accumulate": args.accumulate,
        "precision": precision.name,
        "device": str(device),
        "compiled": args.compile,
        "tf32": torch.backends.cuda.matmul.fp32_precision == "tf32",
        "optimizer": type(optimizer).__name__ + (" (fused)" if optimizer.defaults.get("fused") else ""),
        "train_samples_per_s": round(rate, 1),
        "gflop_per_sample": round(flops / args.batch / 1e9, 3),
        **utilisation(flops, rate / args.batch, peak),
        "peak_tflops": float(f"{peak:.4g}") if peak else None,
        "peak_source": peak_source,
        "forward_backward_only_samples_per_s": round(bare, 1),
        "peak_rss_mb": round(peak_rss_mb()),
    }


run = bench_train
