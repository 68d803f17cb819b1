"""``clip-tao train``: fine-tune (or train from scratch) on ``dataset.train``, validate on ``dataset.val``."""

from __future__ import annotations

import contextlib
import logging
import os

from clip_tao import stopping
from clip_tao.config.checks import check_loss_keys
from clip_tao.config.loader import config_to_dict
from clip_tao.config.schema import ExperimentConfig
from clip_tao.data.loaders import build_train_loader, build_val_loader
from clip_tao.data.pairs import PairOptions
from clip_tao.engine.checkpoint import check_model_type, load_checkpoint
from clip_tao.engine.device import seed_everything
from clip_tao.engine.distributed import DistContext, barrier, cleanup_distributed, setup_distributed
from clip_tao.engine.lora import apply_lora, tower_modes, trainable_counts
from clip_tao.engine.lora import describe as describe_lora
from clip_tao.engine.model_setup import build_model
from clip_tao.engine.regularization import RegularizedLoss, frozen_teacher
from clip_tao.engine.sharded_checkpoint import is_sharded_checkpoint, read_train_state
from clip_tao.engine.trainer import BEST_METRIC, BEST_NAME, LATEST_NAME, Trainer, latest_checkpoint
from clip_tao.engine.weights import load_weights
from clip_tao.io.atomic import write_json
from clip_tao.io.plots import training_curves_png
from clip_tao.io.status import StatusWriter
from clip_tao.io.tables import format_retrieval_table, format_table
from clip_tao.io.task_dir import claim_task_dir, failure_message, prepare_task_dir
from clip_tao.io.wandb_run import start_wandb
from clip_tao.metadata_losses import TripletAugmentedLoss

log = logging.getLogger(__name__)


def run(cfg: ExperimentConfig) -> dict:
    """Train in this process, or as one rank of a torchrun job (only rank 0 writes files)."""
    check_loss_keys(cfg)
    t = cfg.train
    if t.loss_type == "clip" and (t.siglip_loss_mask_mode != "none" or t.siglip_loss_dist_impl != "gather"):
        log.warning("train.loss_type=clip: train.siglip_loss_* apply to the SigLIP loss only and are ignored")
    dist = setup_distributed(cfg.train)
    try:
        with contextlib.ExitStack() as claims:
            if dist.is_main:
                # One run a folder: a second one would interleave checkpoints and status lines.
                claims.enter_context(claim_task_dir(cfg.task_dir("train"), "train"))
                out_dir, status = prepare_task_dir(cfg, "train")
            barrier(dist)  # the folder exists before any rank opens files in it
            if not dist.is_main:
                out_dir, status = cfg.task_dir("train"), StatusWriter(cfg.task_dir("train"), enabled=False)
            # Should the process have to be ended from outside the main thread (see clip_tao.stopping).
            claims.enter_context(stopping.last_words(lambda: status.write("FAILURE", _interrupted())))
            try:
                summary = _train(cfg, out_dir, status, dist)
            except (Exception, KeyboardInterrupt) as exc:
                stop = _as_interruption(exc)
                status.write("FAILURE", failure_message("Training", stop or exc))
                if stop is not None and stop is not exc:
                    raise stop from exc
                raise
            status.write("SUCCESS", "Training finished.", kpi=summary["final"])
            barrier(dist)  # on success only: a failed rank is torn down by torchrun instead
            return summary
    finally:
        cleanup_distributed()


def _interrupted() -> str:
    return failure_message("Training", KeyboardInterrupt(stopping.requested() or "SIGINT"))


def _as_interruption(exc: BaseException) -> KeyboardInterrupt | None:
    """The interruption ``exc`` stands for: itself, or, once a stop signal has come, whatever failed after it
    (under torchrun a peer that stopped first breaks the collective this rank was waiting in)."""
    name = stopping.requested()
    if not isinstance(exc, KeyboardInterrupt) and name is None:
        return None
    stopping.acknowledge()
    return exc if isinstance(exc, KeyboardInterrupt) else KeyboardInterrupt(name)


def _train(cfg: ExperimentConfig, out_dir: str, status, dist: DistContext) -> dict:
    t = cfg.train
    finished = _finished_run(cfg, out_dir)
    if finished is not None:  # nothing to train: no model to build, no empty TensorBoard file
        if dist.is_main:
            _print_summary(finished, out_dir)
        return finished
    # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
    seed_everything(t.seed, t.cudnn.benchmark, t.cudnn.deterministic)
    model = build_model(cfg)
    pairs = PairOptions(t.hard_negatives_per_sample, hash_images=t.duplicate_pairs != "negative")
    mode = t.siglip_loss_mask_mode if t.loss_type == "siglip" else "none"
    accessories = True if "accessory" in mode else (None if mode == "none" else False)
    train_data = build_train_loader(cfg.dataset, model.preprocess, model.tokenizer, dist.rank, dist.world_size,
                                    t.accumulate_grad_batches, pairs, accessories)  # fmt: skip
    val_data = build_val_loader(cfg.dataset, model.preprocess, model.tokenizer, cfg.dataset.pin_memory)
    log.info(
        "%s: %d training samples an epoch, %d validation samples, %d process(es), %s",
        model.model_type, train_data.num_samples, val_data.num_samples if val_data else 0, dist.world_size, out_dir,
    )  # fmt: skip
    latest = latest_checkpoint(out_dir)  # clip_latest.pth, or under FSDP the folder clip_latest.dcp
    auto = t.auto_resume and not t.resume_training_checkpoint_path and latest is not None
    resume_path = t.resume_training_checkpoint_path or (latest if auto else None)
    # Start weights go in before LoRA and the teacher are made from them (and before the optimiser exists);
    # a resumed run replaces them, but its regularisation teacher is still the starting model.
    if t.pretrained_model_path and (not resume_path or cfg.regularization.enabled):
        load_weights(model, t.pretrained_model_path, cfg.peft)
        log.info("start weights from %s", t.pretrained_model_path)
    teacher = frozen_teacher(model) if cfg.regularization.enabled else None
    peft_counts = {}
    if cfg.peft.enabled:
        freeze = {"vision": cfg.model.freeze_vision_encoder, "text": cfg.model.freeze_text_encoder}
        peft_counts = apply_lora(model, cfg.peft, freeze)
    # Before the Trainer opens TensorBoard: wandb.sync_tensorboard must patch it first.
    wandb_run = start_wandb(cfg.wandb, out_dir, config_to_dict(cfg)) if dist.is_main else None
    trainer = Trainer(cfg, model, train_data, val_data, out_dir, status, dist)
    trainer.wandb = wandb_run
    if t.triplet_loss_weight > 0:
        trainer.loss_fn = TripletAugmentedLoss(trainer.loss_fn, t.triplet_loss_weight, t.triplet_margin)
    if teacher is not None:
        trainer.loss_fn = RegularizedLoss(trainer.loss_fn, teacher.to(trainer.device), cfg.regularization,
                                          trainer.precision)  # fmt: skip
    counts = trainable_counts(model)
    if cfg.peft.enabled:
        counts.update(modes=tower_modes(cfg.peft), adapted_modules=peft_counts["adapted_modules"])
    log.info(describe_lora(counts))

    if resume_path:
        if auto:
            log.info("found %s: resuming (set train.auto_resume=false to start over)", latest)
        trainer.resume(resume_path)

    try:
        state = trainer.fit()
    finally:
        if wandb_run is not None:
            wandb_run.finish()
    final = dict(state.history[-1]) if state.history else {}
    summary = {
        "model_type": model.model_type,
        "epochs": state.epoch,
        "steps": state.global_step,
        "final": final,
        "best": {"metric": trainer.best_metric, "value": state.best_value, "epoch": state.best_epoch},
        "skipped_files": dict(trainer.skipped),
    }
    if dist.is_main:
        write_json(os.path.join(out_dir, "training_summary.json"), summary)
        if state.history:
            training_curves_png(state.history, os.path.join(out_dir, "training_curves.png"))
        _print_summary(summary, out_dir)
    return summary


def _finished_run(cfg: ExperimentConfig, out_dir: str) -> dict | None:
    """The summary of the run in ``out_dir`` when auto-resume would continue it past its last epoch, else None."""
    t = cfg.train
    latest = t.resume_training_checkpoint_path or latest_checkpoint(out_dir)
    if not (t.resume_training_checkpoint_path or (t.auto_resume and latest is not None)):
        return None
    # A sharded checkpoint: its plain data only (the weights are not needed to see that the run is done).
    checkpoint = read_train_state(latest) if is_sharded_checkpoint(latest) else load_checkpoint(latest)
    check_model_type(checkpoint, cfg.model.type, latest)
    epoch = checkpoint.get("epoch")
    if not isinstance(epoch, int) or epoch < t.num_epochs:
        return None  # a run to continue (resume() checks the checkpoint in full)
    log.info("%s already finished %d of %d epochs: nothing to do (raise train.num_epochs to train on)",
             latest, epoch, t.num_epochs)  # fmt: skip
    history = checkpoint.get("history") or []
    best = checkpoint.get("best") or {}
    return {
        "model_type": checkpoint.get("model_type"),
        "epochs": epoch,
        "steps": checkpoint.get("global_step"),
        "final": dict(history[-1]) if history else {},
        "best": {"metric": BEST_METRIC, "value": best.get("value"), "epoch": best.get("epoch")},
        "skipped_files": dict(checkpoint.get("skipped") or {}),
    }


def _print_summary(summary: dict, out_dir: str) -> None:
    final = summary["final"]
    best = summary["best"]
    rows = [
        ["model", summary["model_type"]],
        ["epochs / steps", f"{summary['epochs']} / {summary['steps']}"],
        ["final train loss", final.get("train_loss", float("nan"))],
        ["skipped files", sum(summary["skipped_files"].values())],
        ["latest checkpoint", latest_checkpoint(out_dir) or os.path.join(out_dir, LATEST_NAME)],
    ]
    if best["epoch"] is not None:
        rows.append([f"best {best['metric']}", f"{best['value']:.2f} (epoch {best['epoch']}) -> {BEST_NAME}"])
    print("\nTraining summary")
    print(format_table(["", "value"], rows))
    if any(k.startswith("t2i_") for k in final):
        print(f"\nValidation after the last epoch ({final.get('epoch')})")
        print(format_retrieval_table(final))
