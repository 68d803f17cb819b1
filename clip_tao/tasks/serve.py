"""``clip-tao serve``: the spec's model behind Triton's HTTP protocol, OpenAI's ``/v1/embeddings``, ``/embed``,
``/search`` and a search page.

The backend is chosen as in ``evaluate``/``inference``: ``serve.trt_engine`` (TensorRT), ``serve.onnx_file``
(ONNX Runtime), else ``serve.checkpoint`` (PyTorch; null means the type's own weights). SIGTERM or Ctrl-C
stops accepting connections, finishes the requests in flight, then exits.
"""

from __future__ import annotations

import logging
import signal
import socket

from clip_tao.config.schema import ExperimentConfig, ServeConfig
from clip_tao.engine.model_setup import backend_name, build_encoder
from clip_tao.errors import ConfigError
from clip_tao.io.tables import format_table
from clip_tao.io.task_dir import prepare_task_dir

log = logging.getLogger(__name__)


def check_serve_config(s: ServeConfig) -> None:
    if not 0 <= s.port <= 65535:
        raise ConfigError(f"serve.port={s.port} is not a TCP port (0-65535)")
    if s.max_batch_size < 1:
        raise ConfigError(f"serve.max_batch_size={s.max_batch_size} must be >= 1")
    if s.max_queue_delay_ms < 0:
        raise ConfigError(f"serve.max_queue_delay_ms={s.max_queue_delay_ms} must be >= 0")
    if s.max_request_mb <= 0:
        raise ConfigError(f"serve.max_request_mb={s.max_request_mb} must be > 0")
    if s.max_top_k < 1:
        raise ConfigError(f"serve.max_top_k={s.max_top_k} must be >= 1")
    if s.graceful_shutdown_s < 0:
        raise ConfigError(f"serve.graceful_shutdown_s={s.graceful_shutdown_s} must be >= 0")


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a taken port is one clear line, not a log from uvicorn."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"serve: cannot listen on {host}:{port} ({exc.strerror}): choose another serve.port or serve.host"
        ) from None
    sock.set_inheritable(True)
    return sock


def run(cfg: ExperimentConfig) -> dict:
    import uvicorn

    from clip_tao.serve.app import ServeLimits, create_app
    from clip_tao.serve.service import Collection, Embedder

    s = cfg.serve
    check_serve_config(s)
    model, device = build_encoder(cfg, "serve")
    if model.preprocess.naflex:
        # clip_image's Triton input is a fixed [3, H, W] image; patch sequences would need their own protocol.
        raise ConfigError(
            f"model.type={cfg.model.type}: NaFlex models are not served yet; embed with clip-tao inference, "
            "or serve a fixed-size type"
        )
    embedder = Embedder(model, device)
    collection = None
    if s.image_embeddings_file or s.index_file:
        collection = Collection.load(
            s.image_embeddings_file, embedder.embed_dim, s.faiss_min_images, index_file=s.index_file
        )
    limits = ServeLimits(
        max_batch_size=s.max_batch_size,
        max_queue_delay_ms=s.max_queue_delay_ms,
        dynamic_batching=s.dynamic_batching,
        max_request_bytes=int(s.max_request_mb * 2**20),
        max_top_k=s.max_top_k,
    )
    app = create_app(embedder, limits, collection, s.served_model_name)
    sock = _listen(s.host, s.port)
    port = sock.getsockname()[1]  # the one the system chose for serve.port=0
    _, status = prepare_task_dir(cfg, "serve")
    status.write("RUNNING", f"Serving {embedder.model_type} on {s.host}:{port}.")

    url = f"http://{s.host}:{port}"
    batching = f"up to {s.max_batch_size}, {s.max_queue_delay_ms:g} ms" if s.dynamic_batching else "off"
    print(f"\nServing {embedder.model_type} ({backend_name(s)}, dimension {embedder.embed_dim}) at {url}")
    rows = [
        ["Triton / KServe v2", f"{url}/v2/models/clip_image/infer, {url}/v2/models/clip_text/infer"],
        ["embeddings", f"POST {url}/embed"],
        ["OpenAI embeddings", f"POST {url}/v1/embeddings (model {s.served_model_name or embedder.model_type!r})"],
        ["search", f"POST {url}/search ({len(collection)} images)" if collection else "no collection"],
        ["page", f"{url}/"],
        ["dynamic batching", batching],
    ]
    print(format_table(["what", "where"], rows))
    config = uvicorn.Config(
        app,
        host=s.host,
        port=port,
        log_level="info",
        access_log=False,  # one line a request would drown the log under load
        timeout_graceful_shutdown=s.graceful_shutdown_s,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    # Uvicorn handles SIGTERM itself (stop accepting, finish in-flight requests, shut down), then raises it again
    # for the handler that was there before: this one makes that a normal end instead of death by signal.
    stopped_by = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stopped_by.append(signum))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl-C, re-raised by uvicorn once it has shut down gracefully
        stopped_by.append(signal.SIGINT)
    except BaseException as exc:
        status.write("FAILURE", f"The server stopped: {exc!r}")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    if stopped_by:
        log.info("stopped by %s after finishing the requests in flight", signal.Signals(stopped_by[0]).name)
    stats = {name: b.stats for name, b in app.state.batchers.items()}
    summary = {f"{name}_requests": st.inference_count for name, st in stats.items()}
    status.write("SUCCESS", "Server stopped.", kpi=summary)
    return summary
