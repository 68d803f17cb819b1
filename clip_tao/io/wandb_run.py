"""Weights & Biases logging (the ``wandb`` section, TAO's keys and defaults) through the ``wandb`` library.

As in TAO, a run starts only when wandb can work without asking anything: ``WANDB_API_KEY`` is set,
``~/.netrc`` holds a login for the wandb server, or ``WANDB_MODE`` is ``offline``/``disabled`` (no network needed). Otherwise,
and when ``wandb`` is not installed or ``wandb.init`` fails, one warning is logged and training goes on
with TensorBoard only: TAO's default ``enable: true`` never stops or stalls a run. The run's config is the
resolved spec without secrets (``encryption_key``). Only rank 0 logs.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime
from typing import Any

from clip_tao.config.schema import WandbConfig

log = logging.getLogger(__name__)

_NO_NETWORK_MODES = ("offline", "disabled", "dryrun")
_SECRET_KEYS = ("encryption_key",)


class WandbRun:
    """A started run: ``log(scalars, step)`` and ``finish()``."""

    def __init__(self, run, explicit: bool = True):
        self.run = run
        self.explicit = explicit  # False with sync_tensorboard: wandb reads the TensorBoard scalars itself

    def log(self, scalars: dict[str, Any], step: int) -> None:
        if not self.explicit:
            return
        numbers = {k: v for k, v in scalars.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numbers:
            self.run.log(numbers, step=step)

    def finish(self) -> None:
        self.run.finish()


def start_wandb(cfg: WandbConfig, results_dir: str, spec: dict[str, Any]) -> WandbRun | None:
    """A run per ``cfg``, or ``None`` (with one warning when it was asked for but cannot start)."""
    if not cfg.enable:
        return None
    # The login check first: it needs no import (wandb takes a while to import, and most runs stop here).
    mode = os.environ.get("WANDB_MODE", "").lower()
    logged_in = bool(os.environ.get("WANDB_API_KEY")) or _netrc_has_wandb_login()
    if mode not in _NO_NETWORK_MODES and not logged_in:
        log.warning(
            "wandb.enable=true but wandb is not logged in (no WANDB_API_KEY, no ~/.netrc): TensorBoard only "
            "(run `wandb login`, or set WANDB_MODE=offline to log locally, or wandb.enable=false)"
        )
        return None
    try:
        import wandb
    except ImportError:
        log.warning("wandb.enable=true but wandb is not installed: TensorBoard only (pip install wandb)")
        return None
    stamp = datetime.now().strftime("%m:%d:%y_%H:%M:%S")  # TAO appends the start time to the name
    config = {k: v for k, v in spec.items() if k not in _SECRET_KEYS}
    os.makedirs(results_dir, exist_ok=True)
    try:
        run = wandb.init(
            project=cfg.project,
            entity=cfg.entity or None,
            name=f"{cfg.name}_{stamp}" if cfg.name else None,
            group=cfg.group or None,
            tags=list(cfg.tags) or None,
            reinit=True if cfg.reinit else None,
            sync_tensorboard=cfg.sync_tensorboard,
            save_code=cfg.save_code,
            id=cfg.run_id or None,
            resume="allow" if cfg.run_id else None,
            dir=results_dir,
            config=config,
        )
    except Exception as exc:  # wandb raises many kinds (network, auth, usage): none may stop training
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("wandb could not start (%s): TensorBoard only", first)
        return None
    log.info("wandb run %s (%s)", run.name, "offline" if mode == "offline" else "online")
    return WandbRun(run, explicit=not cfg.sync_tensorboard)


def _netrc_has_wandb_login() -> bool:
    """``wandb login`` writes the key to ``~/.netrc`` under the server's host (api.wandb.ai by default)."""
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC", os.path.expanduser("~/.netrc"))
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False
