"""The training loop: contrastive steps, validation, checkpoints, resumption, logging.

Epochs and steps are counted from 0, as TAO (Lightning) names its checkpoints. A step is one optimiser
update over ``train.accumulate_grad_batches`` loader batches. A checkpoint stores everything needed to
continue exactly: weights, optimiser, schedule, loss scaler, RNG states and the position in the epoch
(batches consumed, and for shards where every rank's loader workers stood).

Every process runs the same control flow (collectives stay matched); only rank 0 writes checkpoints,
logs, TensorBoard and status.json.
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
from clip_tao.data.loaders import LoaderBundle, iterate_batches
from clip_tao.engine import distributed as D
from clip_tao.engine.checkpoint import (
    capture_rng_state,
    check_model_type,
    checkpoint_name,
    load_checkpoint,
    model_state_from,
    restore_rng_state,
    save_checkpoint,
)
from clip_tao.engine.device import enable_fast_matmul, resolve_precision
from clip_tao.engine.embedding import embed_loader
from clip_tao.engine.finite import check_weights, overflow_error
from clip_tao.engine.lora import has_lora_weights
from clip_tao.engine.optim import build_optimizer, build_scheduler
from clip_tao.engine.step import contrastive_backward
from clip_tao.errors import ConfigError, ModelError
from clip_tao.io.atomic import link_or_copy
from clip_tao.io.status import StatusWriter
from clip_tao.io.tao_kpi import tao_epoch_fields, tao_retrieval_kpi
from clip_tao.losses import ContrastiveLoss
from clip_tao.metrics import retrieval_metrics
from clip_tao.models.base import ClipModel
from clip_tao.threads import main_process_threads_during

log = logging.getLogger(__name__)

BEST_METRIC = "t2i_mAP"
LATEST_NAME = "clip_latest.pth"
BEST_NAME = "clip_best.pth"
LOG_EVERY = 10  # steps between loss logs: the only host-GPU synchronisations of the training loop


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    global_step: int = 0
    batches_in_epoch: int = 0  # loader batches of the current (unfinished) epoch already trained on
    # Per loader worker of this rank: where its shards stood after its last consumed batch (wds only).
    worker_positions: list[dict] | None = None
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
        dist: D.DistContext | None = None,
    ):
        self.cfg = cfg
        self.tcfg = cfg.train
        self.model = model
        self.train_data = train_data
        self.val_data = val_data
        self.out_dir = out_dir
        self.status = status
        self.dist = dist or D.setup_distributed(cfg.train)
        self.device = self.dist.device
        self.precision = resolve_precision(self.tcfg.precision, self.device)
        self.state = TrainState()
        self.skipped = SkipCounter(train_data.scan_skipped)
        self._check_config()

        self.model.to(self.device)
        enable_fast_matmul(self.device)
        self._freeze_towers()
        if self.tcfg.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.accumulate = self.tcfg.accumulate_grad_batches
        self.batches_per_epoch = len(train_data.loader)
        self.steps_per_epoch = self.batches_per_epoch // self.accumulate
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"train.accumulate_grad_batches={self.accumulate} exceeds the {self.batches_per_epoch} batches "
                "of an epoch: lower it"
            )
        self.total_steps = self.steps_per_epoch * self.tcfg.num_epochs
        # DDP/FSDP wrapping and the optimiser come in fit(), after resume() has loaded plain weights.
        self.net: torch.nn.Module | None = None
        self.optimizer = build_optimizer(model, self.tcfg.optim)
        self.scheduler = build_scheduler(self.optimizer, self.tcfg.optim, self.total_steps)
        self._resume_from: dict[str, Any] | None = None
        self.last_saved: str | None = None  # named when training diverges: the last checkpoint with good weights
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.use_grad_scaler)
        self.loss_fn = ContrastiveLoss(self.tcfg.loss_type, self.dist.rank, self.dist.world_size)
        self.validation_every = self._validation_every()
        self.tensorboard = self._open_tensorboard() if self.dist.is_main else None
        self.wandb = None
        self.sample_log = self._open_sample_log()

    # -- set-up ---------------------------------------------------------------------------------
    def _check_config(self) -> None:
        t = self.tcfg
        for key in ("num_epochs", "checkpoint_interval", "validation_interval", "accumulate_grad_batches"):
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
        if self.tcfg.loss_type == "clip":
            # The softmax loss has no bias: a trainable parameter without gradients trips DDP's checks.
            self.model.logit_bias.requires_grad_(False)

    def _open_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency; stay usable if an environment lacks it
            log.warning("tensorboard is not installed: no TensorBoard logs")
            return None
        return SummaryWriter(os.path.join(self.out_dir, "tensorboard"))

    def _open_sample_log(self):
        path = self.tcfg.sample_log
        if not path:
            return None
        if self.dist.rank:
            path = f"{path}.rank{self.dist.rank}"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return open(path, "a", encoding="utf-8")  # noqa: SIM115 (open for the whole run)

    # -- resumption -----------------------------------------------------------------------------
    def resume(self, path: str) -> None:
        """Continue a run from a training checkpoint with identical optimiser, schedule, scaler, RNG and data."""
        checkpoint = load_checkpoint(path)
        for key in ("optimizer", "scheduler", "epoch", "global_step"):
            if key not in checkpoint:
                raise ModelError(
                    f"{path!r} is not a training checkpoint (no {key!r}): "
                    "use train.pretrained_model_path to start from its weights"
                )
        check_model_type(checkpoint, self.model.model_type, path)
        state = model_state_from(checkpoint, path)
        if has_lora_weights(state) != has_lora_weights(self.model.state_dict()):
            saved = "with" if has_lora_weights(state) else "without"
            raise ModelError(
                f"{path!r} was trained {saved} LoRA adapters, but peft.enabled={self.cfg.peft.enabled}: resume with "
                "the peft section it was trained with (or start over with train.auto_resume=false)"
            )
        try:
            self.model.load_state_dict(state)
        except RuntimeError as exc:  # missing keys or tensors of the wrong shapes
            detail = " ".join(str(exc).split())[:300]
            raise ModelError(f"checkpoint {path!r} does not fit model.type={self.model.model_type}: {detail}") from exc
        self.last_saved = path
        self._resume_from = checkpoint  # optimiser and schedule are loaded in fit(), after wrapping
        if checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        s = self.state
        s.epoch, s.global_step = checkpoint["epoch"], checkpoint["global_step"]
        s.batches_in_epoch = checkpoint.get("batches_in_epoch", 0)
        s.worker_positions = self._data_position_from(checkpoint.get("data_position"))
        best = checkpoint.get("best", {})
        s.best_value = best.get("value", -math.inf)
        s.best_epoch = best.get("epoch")
        s.history = list(checkpoint.get("history", []))
        self.skipped.update(checkpoint.get("skipped", {}))
        rng = checkpoint.get("rng")
        if isinstance(rng, list):  # one state per rank
            rng = rng[self.dist.rank] if self.dist.rank < len(rng) else rng[0]
        if rng:
            restore_rng_state(rng)
        else:
            log.warning("%s holds no random-number states: the run continues, but not as an exact repeat", path)
        self._truncate_sample_log(s.global_step)
        log.info("resumed from %s at epoch %d, step %d", path, s.epoch, s.global_step)

    def _data_position_from(self, saved: dict | None) -> list[dict] | None:
        """This rank's loader-worker positions for resuming mid-epoch (``None`` for custom data).

        A position only carries over to the same data layout (ranks, workers, batch size, data); otherwise
        the interrupted epoch is read again from its start for shards, or skips by batch count for folders.
        """
        s = self.state
        if not s.batches_in_epoch:
            return None
        layout = self.train_data.layout()
        if saved is not None and saved.get("layout") == layout:
            return saved["ranks"][self.dist.rank]
        log.warning(
            "the checkpoint's data layout (%s) differs from this run's (%s): the rest of epoch %d is not the "
            "exact continuation", saved.get("layout") if saved else "not recorded", layout, s.epoch,
        )  # fmt: skip
        if layout["kind"] == "wds":
            s.batches_in_epoch = 0
        return None

    def _truncate_sample_log(self, step: int) -> None:
        """Drop log lines of steps after the checkpoint (a killed run may have logged them)."""
        if self.sample_log is None:
            return
        path = self.sample_log.name
        self.sample_log.close()
        with open(path, encoding="utf-8") as f:
            kept = [line for line in f if int(line.split(" ", 1)[0]) < step]
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(kept)
        self.sample_log = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def _prepare(self) -> None:
        """Wrap the model for DDP/FSDP, (re)build the optimiser for FSDP, load resumed optimiser state."""
        self.net = D.wrap_for_training(self.model, self.dist, self.tcfg.distributed_strategy)
        if self.tcfg.compile:
            self.net.compile()  # in place: parameter names and checkpoints stay those of the plain model
        if D.is_fsdp(self.net):
            # FSDP replaces parameters by sharded ones: the optimiser must be built on those.
            self.optimizer = build_optimizer(self.model, self.tcfg.optim)
            self.scheduler = build_scheduler(self.optimizer, self.tcfg.optim, self.total_steps)
        checkpoint, self._resume_from = self._resume_from, None
        if checkpoint is None:
            return
        if D.is_fsdp(self.net):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(
                self.net, self.optimizer, checkpoint["optimizer"], options=StateDictOptions(full_state_dict=True)
            )
        else:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> TrainState:
        s, t = self.state, self.tcfg
        self._prepare()
        if s.epoch >= t.num_epochs:
            log.info("training already finished %d of %d epochs: nothing to do", s.epoch, t.num_epochs)
        self.status.write("STARTED", "Starting training.", epoch=s.epoch, max_epoch=t.num_epochs - 1)
        while s.epoch < t.num_epochs:
            epoch = s.epoch
            started, first_step = time.time(), s.global_step
            train_loss = self._train_epoch(epoch)
            seconds, steps = time.time() - started, max(s.global_step - first_step, 1)
            kpi: dict[str, Any] = {"train_loss": train_loss, "lr": self._lr(), "logit_scale": self._scale()}
            if hasattr(self.loss_fn, "epoch_figures"):  # the regularisation terms, each on its own
                kpi.update({k: D.all_reduce_mean(self.dist, v) for k, v in self.loss_fn.epoch_figures().items()})
            s.epoch, s.batches_in_epoch, s.worker_positions = epoch + 1, 0, None
            last = s.epoch == t.num_epochs
            if self.val_data is not None and (s.epoch % self.validation_every == 0 or last):
                kpi.update(self.validate())
            # Ranks skip different bad files; rank 0's view decides (only it writes), the others follow it.
            kpi = D.broadcast_object(self.dist, kpi)
            kpi["skipped_files"] = sum(self.skipped.values())
            s.history.append({"epoch": epoch, **kpi})
            self._log_scalars({f"epoch/{k}": v for k, v in kpi.items()}, s.global_step)
            improved = BEST_METRIC in kpi and kpi[BEST_METRIC] > s.best_value
            if improved:
                s.best_value, s.best_epoch = kpi[BEST_METRIC], epoch
            saved = None
            # The last epoch always ends with a checkpoint, whatever the unit of the interval.
            if last or (t.checkpoint_interval_unit == "epoch" and s.epoch % t.checkpoint_interval == 0):
                saved = self.save(epoch)
            if improved:
                self._save_best(saved)
            # TAO's names and scales (val/t2i_mAP as a fraction, in a string; epoch, max_step, eta ...) beside ours.
            progress = tao_epoch_fields(
                epoch, t.num_epochs, s.global_step, self.steps_per_epoch, seconds, seconds / steps
            )
            self.status.write(
                "RUNNING",
                f"Epoch {epoch} done.",
                kpi={**kpi, **tao_retrieval_kpi(kpi, "val")},
                **progress,
                skipped=dict(self.skipped),
            )
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.sample_log is not None:
            self.sample_log.close()
        return s

    def _train_epoch(self, epoch: int) -> float:
        s, t = self.state, self.tcfg
        self.net.train()
        self.train_data.set_epoch(epoch)
        # Resuming mid-epoch: the epoch's order is fixed, so the loader continues after what was consumed.
        skip_batches = s.batches_in_epoch
        self.train_data.resume_at(skip_batches, s.worker_positions)
        positions = list(s.worker_positions or [])
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=skip_batches // self.accumulate,
            # The index that names the epoch's files (model_epoch_000 ...), and the count, so "0/1" is never read as "0 of 1".
            desc=f"epoch {epoch:03d} ({epoch + 1} of {t.num_epochs})",
            unit="step",
            dynamic_ncols=True,
            disable=not self.dist.is_main,
        )
        loss_sum, loss_count, seen, window_start, shown = 0.0, 0, 0, time.time(), math.nan
        end = self.steps_per_epoch * self.accumulate  # leftover batches (< accumulate) are not trained on
        micro: list[dict] = []
        try:
            for batch_index, batch in enumerate(iterate_batches(self.train_data.loader), start=skip_batches):
                if batch_index >= end:
                    break
                self.skipped.update(batch["skipped"])
                if "position" in batch:
                    _record_position(positions, batch["position"])
                micro.append(batch)
                if len(micro) < self.accumulate:
                    continue
                try:
                    loss, count = self._step(micro)
                except RuntimeError as exc:  # a learning rate so large that the update leaves float32
                    error = overflow_error(exc, s.global_step, self.last_saved)
                    if error is None:
                        raise
                    raise error from exc
                micro = []
                if loss is not None:
                    loss_sum += loss
                    loss_count += 1
                    seen += count
                s.global_step += 1
                s.batches_in_epoch = batch_index + 1
                s.worker_positions = positions or None
                rate = seen * self.dist.world_size / max(time.time() - window_start, 1e-9)
                if s.global_step % LOG_EVERY == 0 or loss_count == 1 or batch_index + 1 >= end:  # host waits for GPU
                    shown = self._checked_mean(loss_sum, loss_count)
                loss_shown = {} if math.isnan(shown) else {"loss": f"{shown:.4f}"}  # none before the first log
                # Drawn by update() at tqdm's own pace (every 0.1 s at most), not on every step.
                bar.set_postfix(**loss_shown, lr=f"{self._lr():.2e}", sps=f"{rate:.1f}", refresh=False)
                bar.update(1)
                if t.checkpoint_interval_unit == "step" and s.global_step % t.checkpoint_interval == 0:
                    shown = self._checked_mean(loss_sum, loss_count)  # never save weights after a non-finite loss
                    self.save(epoch)
        finally:
            self.train_data.resume_at(0, None)
            bar.close()
        return D.all_reduce_mean(self.dist, self._checked_mean(loss_sum, loss_count))

    def _checked_mean(self, loss_sum: float | torch.Tensor, count: int) -> float:
        """The mean loss so far as a number (a host synchronisation): training stops if it is not finite."""
        mean = float(loss_sum / max(count, 1))
        if not math.isfinite(mean):
            raise ModelError(
                f"training loss became {mean} by step {self.state.global_step}: lower train.optim.*_lr, "
                "set train.grad_clip_norm, or use precision fp32/bf16"
            )
        return mean

    def _step(self, micro: list[dict]) -> tuple[torch.Tensor | None, int]:
        """One optimiser step over the micro-batches; ``(loss, samples)``, loss (a tensor on the device, not
        waited for) ``None`` when skipped."""
        pairs = [(b["pixels"], b["input_ids"]) for b in micro if "pixels" in b and len(b["indices"]) > 0]
        keys = [k for b in micro if "pixels" in b for k in b["keys"]]
        if self.dist.distributed:
            # Bad files make batches uneven across ranks; the collectives need equal sizes: trim to the smallest.
            pairs, keys = _trim(pairs, keys, D.all_reduce_min(self.dist, sum(len(p) for p, _ in pairs)))
        count = sum(len(p) for p, _ in pairs)
        if count < 2:
            self.scheduler.step()  # keep the schedule in step with global_step
            return None, 0
        self.optimizer.zero_grad(set_to_none=True)
        regularized = hasattr(self.loss_fn, "set_batch")  # RegularizedLoss: the teacher embeds the pairs first
        if regularized:
            self.loss_fn.set_batch(pairs, self.device)
        loss = contrastive_backward(
            self.net, self.loss_fn, pairs, self.precision, self.device,
            self.scaler if self.scaler.is_enabled() else None, self.state.global_step, sync=False,
        )  # fmt: skip
        if self.dist.distributed:
            D.sync_replicated_grads(self.net, self.dist.world_size)
        if self.tcfg.grad_clip_norm is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.tcfg.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.model.clamp_logit_scale()
        if self.sample_log is not None:
            self.sample_log.writelines(f"{self.state.global_step} {k}\n" for k in keys)
            self.sample_log.flush()
        terms = self.loss_fn.end_step() if regularized else {}
        if self.state.global_step % LOG_EVERY == 0:
            self._log_scalars({"train/loss": float(loss), "train/lr": self._lr(), "train/logit_scale": self._scale()})
            self._log_scalars({f"train/{k}": v for k, v in terms.items()})
        return loss, count

    def validate(self) -> dict[str, float]:
        """Retrieval figures on ``dataset.val`` (both directions), computed by rank 0.

        Under FSDP every rank takes part (the parameters are gathered while the towers run).
        """
        if self.net is not None and D.is_fsdp(self.net):
            self.net.unshard()
            try:
                return self._validate_here()
            finally:
                self.net.reshard()
        metrics = self._validate_here() if self.dist.is_main else {}
        D.barrier(self.dist)
        return metrics

    def _validate_here(self) -> dict[str, float]:
        # The training loader's workers have stopped; the validation loader starts its own.
        with main_process_threads_during(self.tcfg.num_threads, self.val_data.loader.num_workers):
            result = embed_loader(self.model, self.val_data.loader, self.device, self.precision, desc="validate")
        if result.image is None or len(result.image) < 2:
            log.warning("validation set has fewer than two usable samples: no validation figures")
            return {}
        metrics = retrieval_metrics(result.image, result.text)
        return {k: v for k, v in metrics.items() if k.startswith(("i2t_", "t2i_")) and "num_queries" not in k}

    # -- outputs --------------------------------------------------------------------------------
    def save(self, epoch: int) -> str:
        """Write ``model_epoch_{epoch:03d}_step_{step:05d}.pth`` (rank 0) and point ``clip_latest.pth`` at it.

        Called on every rank: the state is gathered from all of them.
        """
        path = os.path.join(self.out_dir, checkpoint_name(epoch, self.state.global_step))
        state = self._checkpoint_state()
        if self.dist.is_main:
            check_weights(state["model"], self.state.global_step, self.last_saved)
            save_checkpoint(path, state)
            link_or_copy(path, os.path.join(self.out_dir, LATEST_NAME))
            log.info("saved %s", path)
        self.last_saved = path
        D.barrier(self.dist)
        return path

    def _save_best(self, saved: str | None) -> None:
        """``clip_best.pth``: the epoch's checkpoint when one was saved, else a checkpoint of its own."""
        best = os.path.join(self.out_dir, BEST_NAME)
        state = self._checkpoint_state() if saved is None else None
        if self.dist.is_main:
            if saved is None:
                check_weights(state["model"], self.state.global_step, self.last_saved)
                save_checkpoint(best, state)
            else:
                link_or_copy(saved, best)
            log.info("new best %s=%.2f at epoch %d -> %s", BEST_METRIC, self.state.best_value,
                     self.state.best_epoch, best)  # fmt: skip
        D.barrier(self.dist)

    def _checkpoint_state(self) -> dict[str, Any]:
        """Everything to continue exactly, as plain data; collective (every rank must call it)."""
        s = self.state
        model_state, optim_state = self._model_and_optimizer_state()
        positions = D.gather_objects(self.dist, s.worker_positions)
        rng = D.gather_objects(self.dist, capture_rng_state())
        data_position = None
        if s.batches_in_epoch:
            data_position = {"layout": self.train_data.layout(), "batches_in_epoch": s.batches_in_epoch,
                             "ranks": positions}  # fmt: skip
        return {
            "model": model_state,
            "optimizer": optim_state,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "epoch": s.epoch,
            "global_step": s.global_step,
            "batches_in_epoch": s.batches_in_epoch,
            "data_position": data_position,
            "world_size": self.dist.world_size,
            "best": {"metric": BEST_METRIC, "value": s.best_value, "epoch": s.best_epoch},
            "history": s.history,
            "skipped": dict(self.skipped),
            # One state per rank (each draws from its own generators); a single rank stores a plain dict.
            "rng": rng if self.dist.distributed else rng[0],
            "model_type": self.model.model_type,
            "config": config_to_dict(self.cfg),
        }

    def _model_and_optimizer_state(self) -> tuple[dict, dict]:
        if self.net is not None and D.is_fsdp(self.net):
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model = get_model_state_dict(self.net, options=options)
            optim = get_optimizer_state_dict(self.net, self.optimizer, options=options)
            prefix = "model."
            return {k.removeprefix(prefix): v for k, v in model.items()}, optim
        return self.model.state_dict(), self.optimizer.state_dict()

    def _log_scalars(self, scalars: dict[str, Any], step: int | None = None) -> None:
        if self.wandb is not None:  # a WandbRun (rank 0), set by the task when wandb.enable works
            self.wandb.log(scalars, self.state.global_step if step is None else step)
        if self.tensorboard is None:
            return
        for name, value in scalars.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tensorboard.add_scalar(name, value, self.state.global_step if step is None else step)

    def _lr(self) -> float:
        return max(group["lr"] for group in self.optimizer.param_groups)

    def _scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())


def _record_position(positions: list[dict], position: dict) -> None:
    """Keep the latest position of each loader worker (``position["worker"]``)."""
    worker = position["worker"]
    while len(positions) <= worker:
        positions.append({"pass": 0, "shard": 0, "offset": 0, "yielded": 0})
    positions[worker] = {k: v for k, v in position.items() if k != "worker"}


def _trim(pairs: list, keys: list, size: int) -> tuple[list, list]:
    """The first ``size`` samples of the micro-batches."""
    out, left = [], size
    for pixels, ids in pairs:
        if left <= 0:
            break
        out.append((pixels[:left], ids[:left]))
        left -= len(pixels[:left])
    return out, keys[:size]
