"""The training loop: contrastive steps, validation, checkpoints, resumption, logging.

Epochs and steps are counted from 0, as TAO (Lightning) names its checkpoints. A step is one optimiser
update over ``train.accumulate_grad_batches`` loader batches. A checkpoint stores everything needed to
continue exactly: weights, optimiser, schedule, loss scaler, RNG states and the position in the epoch
(batches consumed, and for shards where every rank's loader workers stood).

Every process runs the same control flow (collectives stay matched); only rank 0 writes checkpoints,
logs, TensorBoard and status.json. Under FSDP every rank writes its own shard of a checkpoint folder instead
(:mod:`clip_tao.engine.sharded_checkpoint`).
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

from clip_tao import stopping
from clip_tao.config.loader import config_to_dict
from clip_tao.config.schema import ExperimentConfig
from clip_tao.data.custom import SkipCounter
from clip_tao.data.loaders import LoaderBundle
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
from clip_tao.engine.regularization import TAO_NAMES, embedding_drift, tao_regularization_kpi
from clip_tao.engine.sharded_checkpoint import (
    SHARDED_SUFFIX,
    is_sharded_checkpoint,
    load_sharded,
    read_train_state,
    refresh_train_state,
    save_sharded,
    sharded_model_keys,
    sharded_name,
)
from clip_tao.engine.step import contrastive_backward
from clip_tao.engine.topk import TopKCheckpoints
from clip_tao.errors import ConfigError, ModelError
from clip_tao.io.atomic import link_latest, link_or_copy, link_or_copy_tree, remove_path
from clip_tao.io.status import StatusWriter
from clip_tao.io.tao_kpi import tao_epoch_fields, tao_retrieval_kpi
from clip_tao.losses import ContrastiveLoss
from clip_tao.metadata_losses import MaskedSiglipLoss, compatibility
from clip_tao.metrics import retrieval_metrics
from clip_tao.models.base import ClipModel
from clip_tao.pas import is_tao_kpi
from clip_tao.threads import main_process_threads_during

log = logging.getLogger(__name__)

BEST_METRIC = "t2i_mAP"
LATEST_NAME = "clip_latest.pth"
LATEST_SHARDED_NAME = "clip_latest.dcp"  # FSDP: a link to the newest sharded checkpoint folder
BEST_NAME = "clip_best.pth"
LOG_EVERY = 10  # steps between loss logs: the only host-GPU synchronisations of the training loop


def latest_checkpoint(out_dir: str) -> str | None:
    """``clip_latest.pth`` or ``clip_latest.dcp``, the newer when both are there (a run that changed between
    DDP and FSDP); ``None`` without either."""
    found = [
        os.path.join(out_dir, n) for n in (LATEST_NAME, LATEST_SHARDED_NAME) if os.path.exists(os.path.join(out_dir, n))
    ]
    return max(found, key=os.path.getmtime) if found else None


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    global_step: int = 0
    batches_in_epoch: int = 0  # loader batches of the current (unfinished) epoch already trained on
    # Shards: where each sample stream of this process stood after the last step (keyed by stream number).
    stream_positions: dict[str, dict] | None = None
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
        self.batches_per_epoch = train_data.batches_per_epoch
        self.steps_per_epoch = self.batches_per_epoch // self.accumulate
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"train.accumulate_grad_batches={self.accumulate} exceeds the {self.batches_per_epoch} batches "
                "of an epoch: lower it"
            )
        self.total_steps = self.steps_per_epoch * self.tcfg.num_epochs
        # FSDP: every rank writes its shard (a .dcp folder); otherwise rank 0 writes TAO's single .pth.
        self.sharded = self.dist.distributed and self.tcfg.distributed_strategy == "fsdp"
        # DDP/FSDP wrapping and the optimiser come in fit(), after resume() has loaded plain weights.
        self.net: torch.nn.Module | None = None
        self.optimizer = build_optimizer(model, self.tcfg.optim)
        self.scheduler = build_scheduler(self.optimizer, self.tcfg.optim, self.total_steps)
        self._resume_from: dict[str, Any] | None = None
        self._resume_sharded: str | None = None  # a sharded checkpoint: weights are loaded after wrapping
        self.last_saved: str | None = None  # named when training diverges: the last checkpoint with good weights
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.use_grad_scaler)
        self.loss_fn = ContrastiveLoss(
            self.tcfg.loss_type,
            self.dist.rank,
            self.dist.world_size,
            duplicate_pairs=self.tcfg.duplicate_pairs,
            dist_impl=self.tcfg.siglip_loss_dist_impl,
        )
        self.metadata_loss = self._metadata_loss()
        if self.metadata_loss is not None:
            self.loss_fn = self.metadata_loss
        self.validation_every = self._validation_every()
        self.tensorboard = self._open_tensorboard() if self.dist.is_main else None
        self.wandb = None
        self.sample_log = self._open_sample_log()
        # Preemption: a SIGTERM inside the training loop first writes the step's checkpoint (under Slurm by default).
        on_sigterm = self.tcfg.checkpoint_on_sigterm
        self.checkpoint_on_sigterm = "SLURM_JOB_ID" in os.environ if on_sigterm is None else on_sigterm
        self._last_step: tuple = (None, 0)
        self.pas = None
        if cfg.dataset.val.metadata_match_eval and val_data is not None:
            from clip_tao.engine.pas_validation import PasValidation

            self.pas = PasValidation(cfg.dataset.val)
        # TAO 7.3: with metadata validation the paired figures give way to the PAS ones.
        self.best_metric = "pas/overall_mAP" if self.pas is not None else BEST_METRIC
        default_monitor = "val/pas/overall_mAP" if self.pas is not None else None
        self.topk = (
            TopKCheckpoints(
                self.tcfg.checkpointer, out_dir, default_monitor, SHARDED_SUFFIX if self.sharded else ".pth"
            )
            if self.tcfg.checkpointer.enable_topk
            else None
        )
        if self.topk is not None and val_data is None:
            raise ConfigError(
                "train.checkpointer.enable_topk=true ranks checkpoints by a validation figure: give dataset.val"
            )

    # -- set-up ---------------------------------------------------------------------------------
    def _check_config(self) -> None:
        t = self.tcfg
        for key in ("num_epochs", "checkpoint_interval", "validation_interval", "accumulate_grad_batches"):
            if getattr(t, key) < 1:
                raise ConfigError(f"train.{key}={getattr(t, key)} must be >= 1")
        if t.grad_clip_norm is not None and t.grad_clip_norm <= 0:
            raise ConfigError(f"train.grad_clip_norm={t.grad_clip_norm} must be > 0 (or null for no clipping)")

    def _metadata_loss(self) -> MaskedSiglipLoss | None:
        t = self.tcfg
        if t.loss_type != "siglip" or t.siglip_loss_mask_mode == "none":
            return None
        if self.train_data.metadata is None:
            raise ConfigError(
                f"train.siglip_loss_mask_mode={t.siglip_loss_mask_mode} needs dataset.train.include_attribute_metadata"
            )
        return MaskedSiglipLoss(
            t.siglip_loss_mask_mode, t.compatible_positive_weight, t.compatible_positive_normalization,
            self.dist.rank, self.dist.world_size, t.siglip_loss_dist_impl,
        )  # fmt: skip

    def _compatibility(self, micro: list[dict], count: int) -> torch.Tensor:
        """The step's metadata mask: its images (this rank's) against its texts (every rank's under gather)."""
        meta = self.train_data.metadata
        rows = torch.cat([b["indices"] for b in micro if "pixels" in b and len(b["indices"]) > 0])[:count]
        accessories = "accessory" in self.tcfg.siglip_loss_mask_mode
        text = [meta["text_attr"][rows], meta["text_acc"][rows] if accessories else None]
        if self.metadata_loss.gather:
            text = [None if t is None else torch.cat(D.gather_objects(self.dist, t)) for t in text]
        image_acc = meta["image_acc"][rows] if accessories else None
        return compatibility(text[0], meta["image_attr"][rows], text[1], image_acc, accessories).T

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
        # With PEFT on, the tower modes (applied before) decide, overriding the freeze flags (TAO 7.3).
        if not self.cfg.peft.enabled:
            for tower, params in (("vision", self.model.vision_parameters), ("text", self.model.text_parameters)):
                if getattr(self.cfg.model, f"freeze_{tower}_encoder"):
                    for p in params():
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
        sharded = is_sharded_checkpoint(path)
        # A sharded checkpoint: only its plain data now; every rank loads its pieces after wrapping (_prepare).
        checkpoint = read_train_state(path) if sharded else load_checkpoint(path)
        needed = ("optimizer_param_groups",) if sharded else ("optimizer",)
        for key in (*needed, "scheduler", "epoch", "global_step"):
            if key not in checkpoint:
                raise ModelError(
                    f"{path!r} is not a training checkpoint (no {key!r}): "
                    "use train.pretrained_model_path to start from its weights"
                )
        check_model_type(checkpoint, self.model.model_type, path)
        state = sharded_model_keys(path) if sharded else model_state_from(checkpoint, path)
        if has_lora_weights(state) != has_lora_weights(self.model.state_dict()):
            saved = "with" if has_lora_weights(state) else "without"
            raise ModelError(
                f"{path!r} was trained {saved} LoRA adapters, but peft.enabled={self.cfg.peft.enabled}: resume with "
                "the peft section it was trained with (or start over with train.auto_resume=false)"
            )
        if sharded:
            self._resume_sharded = path
        else:
            try:
                self.model.load_state_dict(state)
            except RuntimeError as exc:  # missing keys or tensors of the wrong shapes
                detail = " ".join(str(exc).split())[:300]
                raise ModelError(
                    f"checkpoint {path!r} does not fit model.type={self.model.model_type}: {detail}"
                ) from exc
        # clip_latest.dcp is a link: the folder it names is the one to replace (train.checkpointer.replace_periodic)
        self.last_saved = os.path.realpath(path) if sharded else path
        self._resume_from = checkpoint  # optimiser and schedule are loaded in fit(), after wrapping
        if checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        s = self.state
        s.epoch, s.global_step = checkpoint["epoch"], checkpoint["global_step"]
        # Steps, not this process's batches: another process count or accumulation reads the same samples.
        steps = checkpoint.get("steps_in_epoch")
        s.batches_in_epoch = steps * self.accumulate if steps is not None else checkpoint.get("batches_in_epoch", 0)
        s.stream_positions = self._data_position_from(checkpoint.get("data_position"))
        best = checkpoint.get("best", {})
        s.best_value = best.get("value", -math.inf)
        s.best_epoch = best.get("epoch")
        s.history = list(checkpoint.get("history", []))
        if self.topk is not None:
            self.topk.load_state_dict(checkpoint.get("topk"))
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

    def _data_position_from(self, saved: dict | None) -> dict | None:
        """The shards' stream positions for resuming mid-epoch (``None`` for custom data).

        A position carries over to the same data layout (data, global batch, streams), on any number of
        processes and loader workers; otherwise the interrupted epoch is read again from its start for shards,
        or skips by step count for folders.
        """
        s = self.state
        if not s.batches_in_epoch:
            return None
        layout = self.train_data.layout()
        if saved is not None and saved.get("layout") == layout:
            return saved.get("streams")
        log.warning(
            "the checkpoint's data layout (%s) differs from this run's (%s): the rest of epoch %d is not the "
            "exact continuation", saved.get("layout") if saved else "not recorded", layout, s.epoch,
        )  # fmt: skip
        if layout["kind"] == "wds":
            s.batches_in_epoch = 0
        return None

    def _truncate_sample_log(self, step: int) -> None:
        """Drop log lines of steps after the checkpoint (a killed run may have logged them), also from the logs
        of ranks this run no longer has (it resumed on fewer processes)."""
        if self.sample_log is None:
            return
        path = self.sample_log.name
        self.sample_log.close()
        others = []
        if self.dist.is_main:
            rank = self.dist.world_size
            while os.path.exists(f"{path}.rank{rank}"):
                others.append(f"{path}.rank{rank}")
                rank += 1
        for log_path in [path, *others]:
            with open(log_path, encoding="utf-8") as f:
                kept = [line for line in f if int(line.split(" ", 1)[0]) < step]
            with open(log_path, "w", encoding="utf-8") as f:
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
        if checkpoint is not None:
            self._load_resumed(checkpoint)
        # TAO 7.3: the clamp's ceiling is max(ln 100, the starting or restored raw scale).
        self.logit_ceiling = self.model.logit_scale_ceiling()

    def _load_resumed(self, checkpoint: dict[str, Any]) -> None:
        """The optimiser and schedule of the resumed checkpoint, and a sharded checkpoint's weights, into the
        wrapped model (a sharded one loads on any strategy and process count: DCP reshards)."""
        if self._resume_sharded is not None:
            load_sharded(self._resume_sharded, self.net, self.optimizer, checkpoint["optimizer_param_groups"])
        elif D.is_fsdp(self.net):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            optim = _by_parameter_name(checkpoint["optimizer"], self.net, self.optimizer)  # a DDP/1-process .pth
            set_optimizer_state_dict(self.net, self.optimizer, optim, options=StateDictOptions(full_state_dict=True))
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
        # Preemption: a SIGTERM waits for the step, or the epoch's end, in progress (see _stop_if_asked).
        with stopping.checkpoint_first(self.checkpoint_on_sigterm):
            while s.epoch < t.num_epochs:
                epoch = s.epoch
                started, first_step = time.time(), s.global_step
                train_loss = self._train_epoch(epoch)
                seconds, steps = time.time() - started, max(s.global_step - first_step, 1)
                kpi: dict[str, Any] = {"train_loss": train_loss, "lr": self._lr(), "logit_scale": self._scale()}
                if hasattr(self.loss_fn, "epoch_figures"):  # the regularisation terms, each on its own
                    kpi.update({k: D.all_reduce_mean(self.dist, v) for k, v in self.loss_fn.epoch_figures().items()})
                s.epoch, s.batches_in_epoch, s.stream_positions = epoch + 1, 0, None
                last = s.epoch == t.num_epochs
                validated = self.val_data is not None and (s.epoch % self.validation_every == 0 or last)
                if validated:
                    kpi.update(self.validate())
                # Ranks skip different bad files; rank 0's view decides (only it writes), the others follow it.
                kpi = D.broadcast_object(self.dist, kpi)
                kpi["skipped_files"] = sum(self.skipped.values())
                s.history.append({"epoch": epoch, **kpi})
                self._log_scalars({f"epoch/{k}": v for k, v in kpi.items()}, s.global_step)
                tao_names = tao_regularization_kpi(kpi)
                self._log_scalars(tao_names, s.global_step)
                improved = self.best_metric in kpi and kpi[self.best_metric] > s.best_value
                if improved:
                    s.best_value, s.best_epoch = kpi[self.best_metric], epoch
                tao_names.update(tao_retrieval_kpi(kpi, "val"))
                # TAO writes the PAS figures as fractions in strings, under val/pas/...
                tao_names.update({f"val/{k}": str(v) for k, v in kpi.items() if is_tao_kpi(k)})
                # Ranked before the epoch's checkpoint is written, so that it records the ranking it belongs to.
                ranked = self._rank_topk(epoch, kpi, tao_names) if validated and self.topk is not None else None
                saved = None
                # The last epoch always ends with a checkpoint, whatever the unit of the interval.
                if last or (t.checkpoint_interval_unit == "epoch" and s.epoch % t.checkpoint_interval == 0):
                    saved = self.save(epoch)
                if improved:
                    self._save_best(saved)
                if ranked is not None:
                    self._save_topk(*ranked, saved)
                # TAO's names and scales (val/t2i_mAP as a fraction, in a string; epoch, max_step, eta ...) beside ours.
                progress = tao_epoch_fields(
                    epoch, t.num_epochs, s.global_step, self.steps_per_epoch, seconds, seconds / steps
                )
                self.status.write(
                    "RUNNING",
                    f"Epoch {epoch} done.",
                    kpi={**kpi, **tao_names},
                    **progress,
                    skipped=dict(self.skipped),
                )
                self._stop_if_asked(epoch, saved, 0.0, 0)  # a SIGTERM held during validation or the epoch's saves
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
        self.train_data.resume_at(skip_batches, s.stream_positions)
        positions = dict(s.stream_positions or {})
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
        # Closed here, not abandoned: the loader's workers then shut down in ordinary code (see iterate_batches).
        batches = self.train_data.batches()
        # A SIGTERM (preemption) waits for the step in progress in this loop; see _stop_if_asked.
        with stopping.checkpoint_first(self.checkpoint_on_sigterm):
            try:
                for batch_index, batch in enumerate(batches, start=skip_batches):
                    if self._train_on(batch_index, batch, micro, positions, end):
                        break
                    if micro:
                        continue
                    s.global_step += 1
                    s.batches_in_epoch = batch_index + 1
                    s.stream_positions = positions or None
                    loss, count = self._last_step
                    if loss is not None:
                        loss_sum += loss
                        loss_count += 1
                        seen += count
                    rate = seen * self.dist.world_size / max(time.time() - window_start, 1e-9)
                    # Only now and then does the host wait for the GPU to read the loss.
                    if s.global_step % LOG_EVERY == 0 or loss_count == 1 or batch_index + 1 >= end:
                        shown = self._checked_mean(loss_sum, loss_count)
                    loss_shown = {} if math.isnan(shown) else {"loss": f"{shown:.4f}"}  # none before the first log
                    # Drawn by update() at tqdm's own pace (every 0.1 s at most), not on every step.
                    bar.set_postfix(**loss_shown, lr=f"{self._lr():.2e}", sps=f"{rate:.1f}", refresh=False)
                    bar.update(1)
                    saved = None
                    if t.checkpoint_interval_unit == "step" and s.global_step % t.checkpoint_interval == 0:
                        shown = self._checked_mean(loss_sum, loss_count)  # never save weights after a non-finite loss
                        saved = self.save(epoch)
                    self._stop_if_asked(epoch, saved, loss_sum, loss_count)
            finally:
                batches.close()
                self.train_data.resume_at(0, None)
                bar.close()
        return D.all_reduce_mean(self.dist, self._checked_mean(loss_sum, loss_count))

    def _train_on(self, batch_index: int, batch: dict, micro: list[dict], positions: dict, end: int) -> bool:
        """Add a loader batch to the step's micro-batches; run the step when they are complete (its result in
        ``self._last_step``, ``micro`` emptied). True when the epoch's batches are done."""
        if batch_index >= end:
            return True
        self.skipped.update(batch["skipped"])
        positions.update(batch.get("position", {}))
        micro.append(batch)
        if len(micro) < self.accumulate:
            return False
        try:
            self._last_step = self._step(micro)
        except RuntimeError as exc:  # a learning rate so large that the update leaves float32
            error = overflow_error(exc, self.state.global_step, self.last_saved)
            if error is None:
                raise
            raise error from exc
        micro.clear()
        return False

    def _stop_if_asked(self, epoch: int, saved: str | None, loss_sum, loss_count: int) -> None:
        """After a step: a SIGTERM held back for preemption writes this step's checkpoint, then stops the run.
        Every rank decides at the same step (the flag is reduced), as the checkpoint is a collective."""
        if not self.checkpoint_on_sigterm:
            return
        asked = stopping.checkpoint_requested()
        if self.dist.distributed:
            asked = D.all_reduce_min(self.dist, -int(asked)) < 0  # any rank
        if not asked:
            return
        self._checked_mean(loss_sum, loss_count)  # never save weights after a non-finite loss
        if saved is None:
            saved = self.save(epoch)
        log.warning("stopping for SIGTERM after step %d; %s holds it: run the same command to continue",
                    self.state.global_step, saved)  # fmt: skip
        stopping.stop_now()
        raise KeyboardInterrupt("SIGTERM")  # another rank got the signal: stop with it

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
        pairs = [_micro_batch(b) for b in micro if "pixels" in b and len(b["indices"]) > 0]
        keys = [k for b in micro if "pixels" in b for k in b["keys"]]
        if self.dist.distributed:
            # Bad files make batches uneven across ranks; the collectives need equal sizes: trim to the smallest.
            pairs, keys = _trim(pairs, keys, D.all_reduce_min(self.dist, sum(len(p[0]) for p in pairs)))
        count = sum(len(p[0]) for p in pairs)
        if count < 2:
            self.scheduler.step()  # keep the schedule in step with global_step
            return None, 0
        self.optimizer.zero_grad(set_to_none=True)
        if self.metadata_loss is not None:
            self.metadata_loss.set_mask(self._compatibility(micro, count))
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
        self.model.clamp_logit_scale(self.logit_ceiling)
        if self.sample_log is not None:
            self.sample_log.writelines(f"{self.state.global_step} {k}\n" for k in keys)
            self.sample_log.flush()
        terms = self.loss_fn.end_step() if hasattr(self.loss_fn, "end_step") else {}
        if self.state.global_step % LOG_EVERY == 0:
            self._log_scalars({"train/loss": float(loss), "train/lr": self._lr(), "train/logit_scale": self._scale()})
            self._log_scalars({TAO_NAMES[k]: v for k, v in terms.items()})
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
        if self.pas is not None:
            out = self.pas.figures(self.val_data.samples, result)
        else:
            metrics = retrieval_metrics(result.image, result.text)
            out = {k: v for k, v in metrics.items() if k.startswith(("i2t_", "t2i_")) and "num_queries" not in k}
        teacher = getattr(self.loss_fn, "teacher", None)  # regularisation: TAO's drift from the starting model
        if teacher is not None and result.text is not None:
            reference = embed_loader(teacher, self.val_data.loader, self.device, self.precision, desc="teacher")
            out.update(embedding_drift(result, reference))
        return out

    # -- outputs --------------------------------------------------------------------------------
    def save(self, epoch: int) -> str:
        """Write ``model_epoch_{epoch:03d}_step_{step:05d}.pth`` (rank 0) and point ``clip_latest.pth`` at it;
        under FSDP the folder ``....dcp`` (every rank its shard) and ``clip_latest.dcp``.

        Called on every rank: the state is gathered from all of them.
        """
        path = os.path.join(self.out_dir, self._checkpoint_file(checkpoint_name(epoch, self.state.global_step)))
        if self.sharded and path == self.last_saved:
            # This step's folder, written moments ago (a step checkpoint that is also the epoch's): the same tensors,
            # so only its plain data is rewritten; replacing the folder would leave a moment without it.
            refresh_train_state(path, self._training_state(), self.dist)
        else:
            self._write_checkpoint(path)
        if self.dist.is_main:
            if self.sharded:
                link_latest(path, os.path.join(self.out_dir, LATEST_SHARDED_NAME))
            else:
                link_or_copy(path, os.path.join(self.out_dir, LATEST_NAME))
            log.info("saved %s", path)
            previous = self.last_saved
            if self._replace_periodic() and self._periodic_of_this_run(previous, path):
                # No periodic series: only the newest file stays (clip_latest.pth and resumption need it).
                remove_path(previous)
        self.last_saved = path
        D.barrier(self.dist)
        return path

    def _periodic_of_this_run(self, previous: str | None, path: str) -> bool:
        """``previous`` is an older periodic checkpoint in this run's folder (not the latest link, not a
        checkpoint of another run that this one resumed from)."""
        if previous is None or previous == path or os.path.basename(previous) in (LATEST_NAME, LATEST_SHARDED_NAME):
            return False
        return os.path.dirname(os.path.abspath(previous)) == os.path.abspath(self.out_dir)

    def _checkpoint_file(self, name: str) -> str:
        return sharded_name(name) if self.sharded else name

    def _write_checkpoint(self, path: str) -> None:
        """The checkpoint ``path``: a ``.pth`` by rank 0, or a sharded folder by every rank. Collective."""
        if self.sharded:
            save_sharded(path, self.net, self.optimizer, self._training_state(), self.dist, self.state.global_step,
                         self.last_saved)  # fmt: skip
            return
        state = self._checkpoint_state()
        if self.dist.is_main:
            check_weights(state["model"], self.state.global_step, self.last_saved)
            save_checkpoint(path, state)

    def _replace_periodic(self) -> bool:
        c = self.tcfg.checkpointer
        return c.enable_topk and c.replace_periodic

    def _save_best(self, saved: str | None) -> None:
        """``clip_best.pth``: the epoch's checkpoint when one was saved, else a checkpoint of its own
        (``clip_best.dcp`` under FSDP)."""
        best = os.path.join(self.out_dir, self._checkpoint_file(BEST_NAME))
        if saved is None:
            self._write_checkpoint(best)
        if self.dist.is_main:
            if saved is not None:
                _link_or_copy_checkpoint(saved, best)
            log.info("new best %s=%.4g at epoch %d -> %s", self.best_metric, self.state.best_value,
                     self.state.best_epoch, best)  # fmt: skip
        D.barrier(self.dist)

    def _rank_topk(self, epoch: int, kpi: dict, tao_names: dict) -> tuple[str | None, list[str]]:
        figures = {**kpi, **tao_names, "epoch": epoch, "step": self.state.global_step}
        return self.topk.offer(self.topk.value(figures), epoch, figures)

    def _save_topk(self, path: str | None, dropped: list[str], saved: str | None) -> None:
        """Write this epoch's weights under the best-checkpoint name; delete the ones that fell out."""
        if path is None:
            return
        if self.dist.is_main:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        D.barrier(self.dist)
        if saved is None:
            self._write_checkpoint(path)
        if self.dist.is_main:
            if saved is not None:
                _link_or_copy_checkpoint(saved, path)
            for old in dropped:
                remove_path(old)
            log.info("best %s=%s so far: %s", self.topk.monitor, f"{self.topk.kept[0]['value']:.4g}", path)
        D.barrier(self.dist)

    def _checkpoint_state(self) -> dict[str, Any]:
        """Everything to continue exactly, as plain data; collective (every rank must call it)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), **self._training_state()}

    def _training_state(self) -> dict[str, Any]:
        """All but the weights and the optimiser's state; collective (every rank must call it)."""
        s = self.state
        positions = D.gather_objects(self.dist, s.stream_positions)
        rng = D.gather_objects(self.dist, capture_rng_state())
        data_position = None
        if s.batches_in_epoch:
            streams = {key: pos for rank in positions if rank for key, pos in rank.items()}
            data_position = {"layout": self.train_data.layout(), "steps_in_epoch": s.batches_in_epoch // self.accumulate,
                             "streams": streams or None}  # fmt: skip
        return {
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "epoch": s.epoch,
            "global_step": s.global_step,
            "batches_in_epoch": s.batches_in_epoch,
            "steps_in_epoch": s.batches_in_epoch // self.accumulate,
            "data_position": data_position,
            "world_size": self.dist.world_size,
            "best": {"metric": self.best_metric, "value": s.best_value, "epoch": s.best_epoch},
            "topk": self.topk.state_dict() if self.topk is not None else None,
            "history": s.history,
            "skipped": dict(self.skipped),
            # One state per rank (each draws from its own generators); a single rank stores a plain dict.
            "rng": rng if self.dist.distributed else rng[0],
            "model_type": self.model.model_type,
            "config": config_to_dict(self.cfg),
        }

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


def _by_parameter_name(state: dict, net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` (parameters by position, as a DDP or one-process run saves it) keyed by parameter
    name, as torch's ``set_optimizer_state_dict`` takes it; a state keyed by name already is returned as it is."""
    if all(isinstance(key, str) for key in state["state"]):
        return state
    names = {id(p): name for name, p in net.named_parameters()}
    # The same optimiser groups, in the same order, as the run that saved it (build_optimizer on the same model).
    by_position = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {
        "state": {by_position[i]: value for i, value in state["state"].items()},
        "param_groups": [{**g, "params": [by_position[i] for i in g["params"]]} for g in state["param_groups"]],
    }


def _link_or_copy_checkpoint(source: str, target: str) -> None:
    """A second name for a checkpoint file or folder (hard links: deleting one name keeps the other)."""
    if os.path.isdir(source):
        link_or_copy_tree(source, target)
    else:
        link_or_copy(source, target)


def _micro_batch(batch: dict) -> tuple:
    """``(pixels, input_ids)``, with ``(negative_ids, pair_info)`` added when the batch carries them."""
    if "pair_info" not in batch:
        return batch["pixels"], batch["input_ids"]
    return batch["pixels"], batch["input_ids"], batch.get("negative_ids"), batch["pair_info"]


def _trim(pairs: list, keys: list, size: int) -> tuple[list, list]:
    """The first ``size`` samples of the micro-batches (with their hard negatives)."""
    out, left = [], size
    for pair in pairs:
        if left <= 0:
            break
        pixels, ids = pair[0][:left], pair[1][:left]
        if len(pair) > 2 and len(pair[0]) > left:
            negative_ids, info = pair[2], pair[3]
            if negative_ids is not None:  # the filled slots of the kept samples come first
                negative_ids = negative_ids[: int(info.negative_valid[:left].sum())]
                negative_ids = negative_ids if len(negative_ids) else None
            out.append((pixels, ids, negative_ids, info.first(left)))
        else:
            out.append((pixels, ids, *pair[2:]))
        left -= len(pixels)
    return out, keys[:size]
