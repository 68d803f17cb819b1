"""clip-tao's benchmarks: one module a benchmark, all measuring with :mod:`benchmarks.core`.

Each module has ``NAME`` (the sub-command), ``HELP``, ``add_arguments(parser)`` and ``run(args) -> dict``;
``scripts/benchmark.py`` is the command line over them. A new benchmark is a new module listed in ``MODULES``.
"""

MODULES = (
    "train",
    "embed",
    "evaluation",
    "data",
    "serve",
    "quickstart",
    "vs_open_clip",
    "embed_scale",
    "compositional",
    "index",
    "checkpoint",
)
