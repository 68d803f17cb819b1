"""One module a task; each exposes ``run(cfg) -> dict`` (the figures it produced)."""
