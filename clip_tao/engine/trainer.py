"""The training loop: contrastive steps, validation, checkpoints, resumption, logging.

Epochs and steps are counted from 0, as TAO (Lightning) names its checkpoints. A checkpoint stores
everything needed to continue exactly: weights, optimiser, schedule, loss scaler, RNG states and the
position in the epoch.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from clip_tao.config.loader import config_to_dict
from clip_tao.config.schema import ExperimentConfig
from clip_tao.data.custom import SkipCounter
from clip_tao.data.loaders import LoaderBundle
from clip_tao.engine.checkpoint import (
    capture_rng_state,
    checkpoint_name,
    load_checkpoint,
    load_model_weights,
    model_state_from,
    restore_rng_state,
    save_checkpoint,
)
from clip_tao.engine.device import resolve_precision, select_device
from clip_tao.engine.embedding import embed_loader
from clip_tao.engine.optim import build_optimizer, build_scheduler
from clip_tao.errors import ConfigError, ModelError, NotAvailableError
from clip_tao.io.atomic import link_or_copy
from clip_tao.io.status import StatusWriter
from clip_tao.losses import ContrastiveLoss
from clip_tao.metrics import retrieval_metrics
from clip_tao.models.base import ClipModel

log = logging.getLogger(__name__)

BEST_METRIC = "t2i_mAP"
LATEST_NAME = "clip_latest.pth"
BEST_NAME = "clip_best.pth"


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    global_step: int = 0
    batches_in_epoch: int = 0  # batches of the current (unfinished) epoch already trained on
    best_value: float = -math.inf
    best_epoch: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Fits ``model`` on ``train_data``; validates on ``val_data``; writes to ``out_dir``."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        model: ClipModel,
        train_data: LoaderBundle,
        val_data: LoaderBundle | None,
        out_dir: str,
        status: StatusWriter,
    ):
        self.cfg = cfg
        self.tcfg = cfg.train
        self.model = model
        self.train_data = train_data
        self.val_data = val_data
        self.out_dir = out_dir
        self.status = status
        self.device = select_device(self.tcfg.num_gpus, self.tcfg.gpu_ids)
        self.precision = resolve_precision(self.tcfg.precision, self.device)
        self.state = TrainState()
        self.skipped = SkipCounter(train_data.scan_skipped)
        self._check_config()

        self.model.to(self.device)
        self._freeze_towers()
        if self.tcfg.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.steps_per_epoch = len(train_data.loader)
        self.total_steps = self.steps_per_epoch * self.tcfg.num_epochs
        self.optimizer = build_optimizer(model, self.tcfg.optim)
        self.scheduler = build_scheduler(self.optimizer, self.tcfg.optim, self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.use_grad_scaler)
        self.loss_fn = ContrastiveLoss(self.tcfg.loss_type)
        self.validation_every = self._validation_every()
        self.tensorboard = self._open_tensorboard()

    # -- set-up ---------------------------------------------------------------------------------
    def _check_config(self) -> None:
        t = self.tcfg
        if t.num_gpus > 1 or t.num_nodes > 1:
            raise NotAvailableError(
                f"train.num_gpus={t.num_gpus}, train.num_nodes={t.num_nodes}: multi-GPU training is not "
                "available in this version yet; set train.num_gpus=1 and train.num_nodes=1"
            )
        for key in ("num_epochs", "checkpoint_interval", "validation_interval"):
            if getattr(t, key) < 1:
                raise ConfigError(f"train.{key}={getattr(t, key)} must be >= 1")
        if t.grad_clip_norm is not None and t.grad_clip_norm <= 0:
            raise ConfigError(f"train.grad_clip_norm={t.grad_clip_norm} must be > 0 (or null for no clipping)")

    def _validation_every(self) -> int:
        if self.tcfg.val_check_interval is None:
            return self.tcfg.validation_interval
        if self.tcfg.val_check_interval < 1:
            raise ConfigError(
                f"train.val_check_interval={self.tcfg.val_check_interval}: validation runs at epoch ends; "
                "give a whole number of epochs (>= 1)"
            )
        return int(self.tcfg.val_check_interval)

    def _freeze_towers(self) -> None:
        if self.cfg.model.freeze_vision_encoder:
            for p in self.model.vision_parameters():
                p.requires_grad_(False)
        if self.cfg.model.freeze_text_encoder:
            for p in self.model.text_parameters():
                p.requires_grad_(False)

    def _open_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency; stay usable if an environment lacks it
            log.warning("tensorboard is not installed: no TensorBoard logs")
            return None
        return SummaryWriter(os.path.join(self.out_dir, "tensorboard"))

    # -- resumption -----------------------------------------------------------------------------
    def load_start_weights(self, path: str) -> None:
        """``train.pretrained_model_path``: weights only; optimiser and schedule start fresh."""
        load_model_weights(self.model, path)
        log.info("start weights from %s", path)

    def resume(self, path: str) -> None:
        """Continue a run from a training checkpoint with identical optimiser, schedule, scaler and RNG."""
        checkpoint = load_checkpoint(path)
        for key in ("optimizer", "scheduler", "epoch", "global_step"):
            if key not in checkpoint:
                raise ModelError(
                    f"{path!r} is not a training checkpoint (no {key!r}): "
                    "use train.pretrained_model_path to start from its weights"
                )
        self.model.load_state_dict(model_state_from(checkpoint, path))
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        s = self.state
        s.epoch, s.global_step = checkpoint["epoch"], checkpoint["global_step"]
        s.batches_in_epoch = checkpoint.get("batches_in_epoch", 0)
        best = checkpoint.get("best", {})
        s.best_value = best.get("value", -math.inf)
        s.best_epoch = best.get("epoch")
        s.history = list(checkpoint.get("history", []))
        self.skipped.update(checkpoint.get("skipped", {}))
        restore_rng_state(checkpoint["rng"])
        log.info("resumed from %s at epoch %d, step %d", path, s.epoch, s.global_step)

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> TrainState:
        s, t = self.state, self.tcfg
        if s.epoch >= t.num_epochs:
            log.info("training already finished %d of %d epochs: nothing to do", s.epoch, t.num_epochs)
        self.status.write("STARTED", "Starting training.", epoch=s.epoch, max_epoch=t.num_epochs)
        while s.epoch < t.num_epochs:
            epoch = s.epoch
            started = time.time()
            train_loss = self._train_epoch(epoch)
            kpi: dict[str, Any] = {"train_loss": train_loss, "lr": self._lr(), "logit_scale": self._scale()}
            s.epoch, s.batches_in_epoch = epoch + 1, 0
            last = s.epoch == t.num_epochs
            if self.val_data is not None and (s.epoch % self.validation_every == 0 or last):
                kpi.update(self.validate())
            kpi["skipped_files"] = sum(self.skipped.values())
            s.history.append({"epoch": epoch, **kpi})
            self._log_scalars({f"epoch/{k}": v for k, v in kpi.items()}, s.global_step)
            improved = BEST_METRIC in kpi and kpi[BEST_METRIC] > s.best_value
            if improved:
                s.best_value, s.best_epoch = kpi[BEST_METRIC], epoch
            saved = None
            if t.checkpoint_interval_unit == "epoch" and (s.epoch % t.checkpoint_interval == 0 or last):
                saved = self.save(epoch)
            if improved:
                self._save_best(saved)
            self.status.write(
                "RUNNING",
                f"Epoch {epoch} done.",
                kpi=kpi,
                epoch=epoch,
                max_epoch=t.num_epochs,
                time_per_epoch=f"{time.time() - started:.1f}s",
                skipped=dict(self.skipped),
            )
        if self.tensorboard is not None:
            self.tensorboard.close()
        return s

    def _train_epoch(self, epoch: int) -> float:
        s, t = self.state, self.tcfg
        self.model.train()
        self.train_data.set_epoch(epoch)
        # Resuming mid-epoch: the sampler's order is fixed by the epoch, so skip what was already seen.
        skip_batches = s.batches_in_epoch
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=skip_batches,
            desc=f"epoch {epoch}/{t.num_epochs - 1}",
            unit="step",
            dynamic_ncols=True,
        )
        loss_sum, loss_count, seen, window_start = 0.0, 0, 0, time.time()
        for batch_index, batch in enumerate(self._batches(skip_batches), start=skip_batches):
            self.skipped.update(batch["skipped"])
            if "pixels" in batch and len(batch["indices"]) > 1:
                loss = self._step(batch)
                loss_sum += loss
                loss_count += 1
                seen += len(batch["indices"])
            s.global_step += 1
            s.batches_in_epoch = batch_index + 1
            rate = seen / max(time.time() - window_start, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / max(loss_count, 1):.4f}", lr=f"{self._lr():.2e}", sps=f"{rate:.1f}")
            if t.checkpoint_interval_unit == "step" and s.global_step % t.checkpoint_interval == 0:
                self.save(epoch)
        bar.close()
        return loss_sum / max(loss_count, 1)

    def _batches(self, skip_batches: int):
        loader = self.train_data.loader
        sampler = loader.sampler
        if skip_batches:
            sampler.start_index = skip_batches * loader.batch_size
        try:
            yield from loader
        finally:
            sampler.start_index = 0

    def _step(self, batch: dict) -> float:
        pixels = batch["pixels"].to(self.device, non_blocking=True)
        input_ids = batch["input_ids"].to(self.device, non_blocking=True)
        with self.precision.autocast(self.device):
            image_emb, text_emb = self.model(pixels, input_ids)
            loss = self.loss_fn(image_emb.float(), text_emb.float(), self.model.logit_scale, self.model.logit_bias)
        if not torch.isfinite(loss):
            raise ModelError(
                f"training loss became {loss.item()} at step {self.state.global_step}: lower train.optim.*_lr, "
                "set train.grad_clip_norm, or use precision fp32/bf16"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.tcfg.grad_clip_norm is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.tcfg.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.model.clamp_logit_scale()
        value = loss.item()
        if self.state.global_step % 10 == 0:
            self._log_scalars({"train/loss": value, "train/lr": self._lr(), "train/logit_scale": self._scale()})
        return value

    def validate(self) -> dict[str, float]:
        """Retrieval figures on ``dataset.val`` (both directions)."""
        result = embed_loader(self.model, self.val_data.loader, self.device, self.precision, desc="validate")
        if result.image is None or len(result.image) < 2:
            log.warning("validation set has fewer than two usable samples: no validation figures")
            return {}
        metrics = retrieval_metrics(result.image, result.text)
        return {k: v for k, v in metrics.items() if k.startswith(("i2t_", "t2i_")) and "num_queries" not in k}

    # -- outputs --------------------------------------------------------------------------------
    def save(self, epoch: int) -> str:
        """Write ``model_epoch_XXX_step_XXXXX.pth`` and point ``clip_latest.pth`` at it."""
        path = os.path.join(self.out_dir, checkpoint_name(epoch, self.state.global_step))
        save_checkpoint(path, self._checkpoint_state())
        link_or_copy(path, os.path.join(self.out_dir, LATEST_NAME))
        log.info("saved %s", path)
        return path

    def _save_best(self, saved: str | None) -> None:
        """``clip_best.pth``: the epoch's checkpoint when one was saved, else a checkpoint of its own."""
        best = os.path.join(self.out_dir, BEST_NAME)
        if saved is None:
            save_checkpoint(best, self._checkpoint_state())
        else:
            link_or_copy(saved, best)
        log.info("new best %s=%.2f at epoch %d -> %s", BEST_METRIC, self.state.best_value, self.state.best_epoch, best)

    def _checkpoint_state(self) -> dict[str, Any]:
        s = self.state
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "epoch": s.epoch,
            "global_step": s.global_step,
            "batches_in_epoch": s.batches_in_epoch,
            "best": {"metric": BEST_METRIC, "value": s.best_value, "epoch": s.best_epoch},
            "history": s.history,
            "skipped": dict(self.skipped),
            "rng": capture_rng_state(),
            "model_type": self.model.model_type,
            "config": config_to_dict(self.cfg),
        }

    def _log_scalars(self, scalars: dict[str, Any], step: int | None = None) -> None:
        if self.tensorboard is None:
            return
        for name, value in scalars.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tensorboard.add_scalar(name, value, self.state.global_step if step is None else step)

    def _lr(self) -> float:
        return max(group["lr"] for group in self.optimizer.param_groups)

    def _scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())
