"""``serve``: ``clip-tao serve`` started on 127.0.0.1 with dynamic batching on, then off; N concurrent
``tritonclient.http`` clients send one-item requests; requests/s, p50/p99 latency and the mean batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from benchmarks.core import register_openclip_arch

NAME = "serve"
HELP = "clip-tao serve on 127.0.0.1: throughput and p50/p99 latency, batching on and off"


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="tiny-clip")
    parser.add_argument("--onnx-file", help="serve this exported file (ONNX Runtime) instead of the PyTorch model")
    parser.add_argument(
        "--openclip-arch", help="export one of open_clip's architectures (random init), serve it with ONNX Runtime"
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2000, help="requests a measurement (one item each)")
    parser.add_argument("--kinds", nargs="+", default=["text", "image"], choices=["text", "image"])
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--delay-ms", type=float, default=5.0)


def _start_server(spec: str, overrides: list[str], log_path: str) -> tuple[subprocess.Popen, int]:
    """``clip-tao serve`` on 127.0.0.1 and a free port, once it answers ``/v2/health/ready``."""
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "clip_tao", "serve", "-e", spec, "serve.host=127.0.0.1", f"serve.port={port}"]
    log = open(log_path, "w")  # noqa: SIM115 - the child keeps writing to it
    process = subprocess.Popen([*command, *overrides], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as r:
                if r.status == 200:
                    return process, port
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"the server was not ready in 180 s; see {log_path}")


def _drive(port: int, kind: str, clients: int, requests: int, image_size: int) -> dict:
    """``requests`` single-item requests from ``clients`` concurrent tritonclient clients; latency and throughput."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import tritonclient.http as triton

    model = "clip_text" if kind == "text" else "clip_image"
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((1, 3, image_size, image_size)).astype(np.float32)

    def one_client(index: int) -> list[float]:
        client = triton.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=120)
        latencies = []
        for i in range(index, requests, clients):
            if kind == "text":
                tensor = triton.InferInput("text", [1, 1], "BYTES")
                tensor.set_data_from_numpy(np.array([[f"a photo of thing number {i}".encode()]], dtype=object))
            else:
                tensor = triton.InferInput("image", list(pixels.shape), "FP32")
                tensor.set_data_from_numpy(pixels)
            start = time.perf_counter()
            client.infer(model, [tensor])
            latencies.append(time.perf_counter() - start)
        client.close()
        return latencies

    one_client(0) if requests > clients else None  # warm-up outside the timing
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [x for part in pool.map(one_client, range(clients)) for x in part]
    wall = time.perf_counter() - start
    client = triton.InferenceServerClient(f"127.0.0.1:{port}")
    (stats,) = client.get_inference_statistics(model)["model_stats"]
    client.close()
    ms = np.asarray(latencies) * 1000
    return {
        "requests": len(latencies),
        "requests_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "mean_batch": round(stats["inference_count"] / max(stats["execution_count"], 1), 2),
    }


def bench_serve(args) -> dict:
    """``clip-tao serve`` with dynamic batching on and off, driven by N concurrent clients on 127.0.0.1."""
    import tempfile

    import yaml

    from clip_tao.io.tables import format_table
    from clip_tao.models import create_model

    folder = tempfile.mkdtemp(prefix="clip_tao_bench_serve_")
    if args.openclip_arch:  # the server process cannot see a type registered here: serve an ONNX export of it
        from clip_tao.deploy.onnx_export import export_onnx

        args.model = register_openclip_arch(args.openclip_arch)
        args.onnx_file = os.path.join(folder, "export", "clip.onnx")
        export_onnx(create_model(args.model, pretrained=False).eval(), args.onnx_file, encoder_type="separate")
        args.onnx_file = os.path.join(folder, "export", "clip_vision.onnx")
    image_size = create_model(args.model, pretrained=False).image_size
    spec = os.path.join(folder, "spec.yaml")
    serve = {"max_batch_size": args.max_batch, "max_queue_delay_ms": args.delay_ms}
    if args.onnx_file:
        serve["onnx_file"] = args.onnx_file
    with open(spec, "w") as f:
        yaml.safe_dump(
            {"results_dir": os.path.join(folder, "results"), "model": {"type": args.model}, "serve": serve}, f
        )
    results, rows = {}, []
    for batching in ("on", "off"):
        log_path = os.path.join(folder, f"server_{batching}.log")
        process, port = _start_server(spec, [f"serve.dynamic_batching={batching == 'on'}"], log_path)
        try:
            for kind in args.kinds:
                r = _drive(port, kind, args.clients, args.requests, image_size)
                results[f"{kind}_batching_{batching}"] = r
                rows.append(
                    [kind, batching, r["requests"], r["requests_per_s"], r["p50_ms"], r["p99_ms"], r["mean_batch"]]
                )
        finally:
            process.terminate()
            process.wait(60)
    print(f"\nclip-tao serve, {args.model} ({'ONNX Runtime' if args.onnx_file else 'PyTorch'}), {args.clients} clients, "
          f"max_batch_size {args.max_batch}, max_queue_delay_ms {args.delay_ms}")  # fmt: skip
    print(format_table(["input", "batching", "requests", "requests/s", "p50 ms", "p99 ms", "mean batch"], rows))
    return {"model": args.model, "clients": args.clients, **results}


run = bench_serve
