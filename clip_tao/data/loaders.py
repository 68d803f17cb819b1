"""DataLoaders built from the spec: image-text batches for training/evaluation, images or texts for embedding.

A batch is a dict: ``pixels [B,3,H,W]`` (a :class:`~clip_tao.models.patches.PatchBatch` for NaFlex
models, whose images keep their aspect ratio), ``input_ids [B,L]`` (when captions are loaded), ``indices [B]``
(positions in the dataset), ``keys`` (sample names) and ``skipped`` (a :class:`SkipCounter` of files dropped
from this batch). An image that cannot be decoded is dropped from its batch and counted, never fatal.
The last training batch of a step of WebDataset shards also carries ``position`` (where each of the
process's sample streams stands).

Training randomness is a function of the data, not of the process: the sample order comes from
``dataset.seed + epoch`` and each sample's augmentation from ``(dataset.seed, epoch, sample)``, so any
number of processes and loader workers gives the same global steps at the same global batch, and a resumed
run continues exactly, also on another number of processes or workers (see :meth:`LoaderBundle.resume_at`).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from clip_tao import stopping
from clip_tao.config.schema import DatasetConfig, DatasetEntry
from clip_tao.data import wds
from clip_tao.data.custom import Sample, SkipCounter, scan_custom_datasets
from clip_tao.data.naflex import batch_stacker
from clip_tao.data.pairs import NO_PAIRS, PairOptions, draw_negatives, pair_fields
from clip_tao.data.samplers import BalancedQueryTypeSampler, EpochShuffleSampler, UniqueCaptionBatchSampler
from clip_tao.data.token_cache import CachedTokenizer
from clip_tao.data.transforms import build_eval_transform, build_train_transform
from clip_tao.errors import ConfigError, DataError
from clip_tao.models.base import Preprocess
from clip_tao.models.patches import PatchBudgetError
from clip_tao.pair_losses import text_id
from clip_tao.threads import one_thread_per_worker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Bad:
    """Stands in for a sample whose image could not be decoded."""

    reason: str


class ImageTextDataset(Dataset):
    """Decodes, transforms and tokenizes one :class:`Sample` at a time.

    With ``augment_seed`` set, sample ``i`` of epoch ``e`` is transformed with torch's RNG seeded from
    ``(augment_seed, e, i)``: the same pixels whichever worker loads it.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable,
        tokenizer: Callable | None,
        augment_seed: int | None = None,
        draft_side: int | None = None,
        tokenize_in_collate: bool = False,
        pairs: PairOptions = NO_PAIRS,
    ):
        self.samples = list(samples)
        self.pairs = pairs  # hard negatives and duplicate ids (training)
        self.transform = transform
        self.tokenizer = tokenizer
        # Tokenizing a whole batch in the collate function is cheaper than one caption at a time.
        self.tokenize_in_collate = tokenize_in_collate
        self.augment_seed = augment_seed
        self.draft_side = draft_side  # see wds.open_rgb
        self.epoch = 0  # set before an epoch's workers start; they take a copy

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict | _Bad:
        return self._load(index)

    def __getitems__(self, indices: Sequence[int]) -> list[dict | _Bad]:
        """A batch's samples (the DataLoader asks for them together), saving and restoring torch's default
        generator once for the batch rather than once a sample."""
        if self.augment_seed is None:
            return [self._load(index) for index in indices]
        with wds.default_generator_kept():
            return [self._load(index, keep_state=False) for index in indices]

    def _load(self, index: int, keep_state: bool = True) -> dict | _Bad:
        sample = self.samples[index]
        seed = None if self.augment_seed is None else wds.sample_seed(self.augment_seed, self.epoch, index)
        try:
            image = wds.open_rgb(sample.image_path, self.draft_side)
            pixels = wds.seeded_transform(self.transform, image, seed, keep_state)
        except PatchBudgetError as exc:
            log.warning("%s: %s; skipped", sample.image_path, exc)
            return _Bad(PatchBudgetError.reason)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
            return _Bad("undecodable_image")
        item = {"pixels": pixels, "index": index, "key": sample.key}
        if self.tokenizer is not None and sample.caption is not None:
            caption = self._caption(sample, seed)
            if self.tokenize_in_collate:
                item["caption"] = caption
            else:
                item["input_ids"] = self.tokenizer([caption])[0]
            if self.pairs.enabled:
                neg_seed = None if seed is None else wds.sample_seed(seed, "negatives")
                item["captions"] = sample.captions
                item["image_id"] = sample.content_id if sample.content_id is not None else text_id(sample.image_path)
                item["negatives"] = draw_negatives(sample.negative_captions, self.pairs.negatives_per_sample, neg_seed)
        return item

    @staticmethod
    def _caption(sample: Sample, seed: int | None) -> str:
        """The first caption, or in training (seeded) one of a multi-caption image's captions, drawn from
        the sample's own seed: every caption gets used, and a resumed run draws the same ones."""
        if seed is None or not sample.extra_captions:
            return sample.caption
        captions = sample.captions
        return captions[seed % len(captions)]


def collate_skipping_bad(
    items: list, tokenizer: Callable | None = None, stack: Callable = torch.stack, negatives_per_sample: int = 0
) -> dict:
    """Stack the good items (``stack``: see :func:`~clip_tao.data.naflex.batch_stacker`); count the bad ones
    in ``batch["skipped"]``; tokenize ``caption`` items together; add :func:`pair_fields` when items have them."""
    skipped = SkipCounter(item.reason for item in items if isinstance(item, _Bad))
    good = [item for item in items if not isinstance(item, _Bad)]
    batch: dict = {
        "skipped": skipped,
        "indices": torch.tensor([item["index"] for item in good], dtype=torch.long),
        "keys": [item.get("key") for item in good],
    }
    if good:
        batch["pixels"] = stack([item["pixels"] for item in good])
        if "input_ids" in good[0]:
            batch["input_ids"] = torch.stack([item["input_ids"] for item in good])
        elif "caption" in good[0] and tokenizer is not None:
            batch["input_ids"] = tokenizer([item["caption"] for item in good])
        if "negatives" in good[0] and tokenizer is not None:
            batch.update(pair_fields(good, tokenizer, negatives_per_sample))
    return batch


@dataclass
class LoaderBundle:
    """A DataLoader with the samples behind it (custom data; empty for shards) and what scanning skipped.

    Training iterates :meth:`batches` (shards come from the loader as per-step chunks of each worker, which
    it joins and cuts into loader batches); ``global_batch`` is the samples of one optimiser step over all
    processes and accumulated batches, what the epoch's order is cut into.
    """

    loader: DataLoader
    samples: list[Sample]
    scan_skipped: SkipCounter
    kind: str = "custom"  # or "wds"
    num_samples: int | None = None  # samples an epoch (all ranks); None: len(samples)
    global_batch: int | None = None
    pin_joined: bool = False  # shards: the join of a step's chunks writes into pinned memory
    # TAO 7.3 attribute metadata per sample index (dataset.train.include_attribute_metadata), else None.
    metadata: dict | None = None

    def __post_init__(self):
        if self.num_samples is None:
            self.num_samples = len(self.samples)

    @property
    def stream_plan(self) -> wds.StreamPlan | None:
        dataset = self.loader.dataset
        return dataset.plan if isinstance(dataset, wds.WdsTrainStream) else None

    @property
    def batches_per_epoch(self) -> int:
        """Loader batches this process trains on in an epoch."""
        plan = self.stream_plan
        return plan.steps_per_epoch * plan.accumulate if plan else len(self.loader)

    def batches(self):
        """The loader's batches in training order (see :func:`iterate_batches`)."""
        plan = self.stream_plan
        batches = iterate_batches(self.loader)
        if not plan:
            return batches
        stream = self.loader.dataset
        # Before the workers start (they inherit them): step buffers the workers fill in place, unless the
        # join writes into pinned memory anyway.
        stream.buffers = None if self.pin_joined else stream.make_step_buffers()
        return _forgetting_buffers(stream, wds.regroup_steps(batches, plan, self.pin_joined, stream.buffers))

    def set_epoch(self, epoch: int) -> None:
        """Re-seed shuffling, augmentation and worker seeds for ``epoch`` (deterministic across restarts)."""
        sampler = self.loader.sampler
        dataset = self.loader.dataset
        if hasattr(dataset, "epoch"):
            dataset.epoch = epoch
        if isinstance(sampler, EpochShuffleSampler):
            sampler.set_epoch(epoch)
        if self.loader.generator is not None:
            self.loader.generator.manual_seed(getattr(dataset, "seed", 0) + epoch)

    def layout(self) -> dict:
        """What a checkpointed position depends on. Never the processes or loader workers: a run resumes
        exactly on any layout that gives the same global batch."""
        plan = self.stream_plan
        if plan is not None:
            return {"kind": "wds", "streams": plan.streams, "global_batch": plan.global_batch,
                    "shards": len(self.loader.dataset.shards), "samples": self.num_samples}  # fmt: skip
        layout = {"kind": self.kind, "global_batch": self.global_batch, "samples": len(self.samples)}
        sampler = self.loader.sampler
        if isinstance(sampler, UniqueCaptionBatchSampler):  # its batches are built per process batch and rank count
            layout["unique_caption_batches"] = [sampler.batch_size, sampler.world_size]
        return layout

    def resume_at(self, batches_done: int, stream_positions: dict | None) -> None:
        """Make the next iteration start after the first ``batches_done`` loader batches of this process's epoch.

        Custom data skips that many batches of the epoch's permutation. Shards reopen each stream where it
        stood (``stream_positions``, as recorded in the batches' ``position``). ``resume_at(0, None)`` starts
        the epoch afresh.
        """
        dataset = self.loader.dataset
        if isinstance(dataset, wds.WdsTrainStream):
            dataset.resume = stream_positions if batches_done else None
            dataset.start_step = batches_done // dataset.plan.accumulate
        elif isinstance(self.loader.sampler, EpochShuffleSampler):
            self.loader.sampler.start_index = batches_done * self.loader.batch_size


def _forgetting_buffers(stream: wds.WdsTrainStream, batches):
    """``batches``, then the stream's step buffers dropped: a later plain iteration of the loader gets whole chunks."""
    try:
        yield from batches
    finally:
        stream.buffers = None


def iterate_batches(loader: DataLoader):
    """``iter(loader)``, with a :class:`DataError` raised in a worker process turned back into its one line
    (the DataLoader re-raises it with the worker's whole traceback as the message).

    The workers start with a stop deferred (see :mod:`clip_tao.stopping`) and are shut down here, in ordinary
    code, not in the iterator's ``__del__`` where a signal would be dropped. Close the generator (or exhaust it)
    rather than abandon it. On a stop the workers are terminated at once: their batches are no use any more.
    """
    batches = None
    try:
        with stopping.deferred():
            batches = iter(loader)
        yield from batches
    except DataError as exc:
        message = str(exc).strip().splitlines()
        if len(message) > 1 and message[0].startswith("Caught DataError"):
            raise DataError(message[-1].split("DataError: ", 1)[-1]) from exc
        raise
    except KeyboardInterrupt:
        stopping.acknowledge()
        for worker in getattr(batches, "_workers", ()):
            if worker.is_alive():
                worker.terminate()  # torch's worker handler exits at once on its parent's SIGTERM
        raise
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # torch's own shutdown, also what __del__ calls
        if shutdown is not None and not getattr(loader, "persistent_workers", False):
            shutdown()


def init_worker(worker_id: int) -> None:
    """``worker_init_fn`` of every DataLoader: one compute thread, and signals left to the main process."""
    stopping.in_loader_worker()
    one_thread_per_worker(worker_id)


def effective_workers(requested: int, key: str) -> int:
    """``requested`` capped at the CPU count (TAO's default of 8 oversubscribes small machines)."""
    if requested < 0:
        raise ConfigError(f"{key}={requested} must be >= 0")
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if requested > available:
        log.info("%s=%d capped at the %d available CPUs", key, requested, available)
        return available
    return requested


def build_train_loader(
    data_cfg: DatasetConfig,
    preprocess: Preprocess,
    tokenizer: Callable,
    rank: int = 0,
    world_size: int = 1,
    accumulate: int = 1,
    pairs: PairOptions = NO_PAIRS,
    train_accessories: bool | None = None,
) -> LoaderBundle:
    """Shuffled, augmented image-text batches from ``dataset.train`` for ``rank`` of ``world_size``, whose
    optimiser steps take ``accumulate`` batches each.

    The samples of a global step (``batch_size x world_size x accumulate`` of them) depend only on the data,
    ``dataset.seed``, the epoch and that global batch: custom data takes consecutive runs of the epoch's
    permutation, shards take the same share of every canonical stream (:class:`~clip_tao.data.wds.StreamPlan`).

    ``pairs``: hard-negative slots and image hashing (see :mod:`clip_tao.data.pairs`); custom folders get
    negative slots only when an entry has a ``negative_caption_dir``. ``train_accessories``: with
    ``include_attribute_metadata``, whether the accessory fields are required (True), ignored (False) or read
    when present (None).
    """
    train = data_cfg.train
    if pairs.negatives_per_sample < 0:
        raise ConfigError(f"train.hard_negatives_per_sample={pairs.negatives_per_sample} must be >= 0")
    if train.type != "wds" and not any(entry.negative_caption_dir for entry in train.datasets):
        pairs = PairOptions(0, pairs.hash_images)
    if train.batch_size < 1:
        raise ConfigError(f"dataset.train.batch_size={train.batch_size} must be >= 1")
    transform = build_train_transform(preprocess, data_cfg.augmentation)
    workers = effective_workers(train.num_workers, "dataset.train.num_workers")
    pin = data_cfg.pin_memory and torch.cuda.is_available()
    # NaFlex sizes follow each crop's shape: decode at full scale rather than risk upsampling a crop.
    draft = None if preprocess.naflex else wds.draft_side_for(preprocess.image_size, data_cfg.augmentation.scale[0])
    stack = batch_stacker(preprocess)
    if train.type == "wds":
        shards = wds.list_shards(train.wds, "dataset.train.wds")
        total = wds.epoch_samples(shards, train.wds.samples_per_shard)
        plan = wds.plan_streams(shards, total, train.batch_size, world_size, workers, "dataset.train.wds",
                                accumulate, train.wds.streams)  # fmt: skip
        stream = wds.WdsTrainStream(shards, plan, rank, transform, tokenizer, data_cfg.seed, draft, stack, pairs)
        # Several workers' chunks are joined into a step's batch: pinned by that join, not chunk by chunk.
        pin_chunks = pin and plan.readers_per_rank == 1
        loader = DataLoader(stream, batch_size=None, num_workers=plan.workers, pin_memory=pin_chunks,
                            worker_init_fn=init_worker)  # fmt: skip
        log.info("dataset.train.wds: %d shards in %d sample streams, %d samples an epoch, %d steps of %d",
                 len(shards), plan.streams, total, plan.steps_per_epoch, plan.global_batch)  # fmt: skip
        return LoaderBundle(loader, [], SkipCounter(), kind="wds", num_samples=total, global_batch=plan.global_batch,
                            pin_joined=pin and not pin_chunks)  # fmt: skip
    samples, skipped = scan_custom_datasets(train.datasets, "dataset.train.datasets", hash_images=pairs.hash_images)
    tokenizer = CachedTokenizer(tokenizer)  # every caption comes back every epoch
    dataset = ImageTextDataset(samples, transform, tokenizer, data_cfg.seed, draft, tokenize_in_collate=True,
                               pairs=pairs)  # fmt: skip
    dataset.seed = data_cfg.seed
    if train.balance_query_types:
        from clip_tao.data.pas_metadata import sample_query_types

        kinds, captions = sample_query_types(samples, train.datasets, "dataset.train.datasets")
        sampler = _balanced_sampler(train, kinds, captions, data_cfg.seed, rank, world_size)
        log.info(
            "dataset.train.balance_query_types: %s", ", ".join(f"{k} {kinds.count(k)}" for k in sorted(set(kinds)))
        )
    else:
        sampler = EpochShuffleSampler(len(dataset), data_cfg.seed, rank, world_size)
    if sampler.per_rank < 1:
        raise DataError(f"dataset.train.datasets: {len(dataset)} samples cannot be split over {world_size} ranks")
    loader = DataLoader(
        dataset,
        batch_size=train.batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=functools.partial(
            collate_skipping_bad, tokenizer=tokenizer, stack=stack, negatives_per_sample=pairs.negatives_per_sample
        ),  # fmt: skip
        pin_memory=pin,
        worker_init_fn=init_worker,
        # Contrastive batches lose their point when tiny; keep every sample only if there is one batch.
        drop_last=sampler.per_rank > train.batch_size,
        generator=torch.Generator().manual_seed(data_cfg.seed),
        persistent_workers=False,
    )
    metadata = None
    if train.include_attribute_metadata:
        from clip_tao.data.pas_metadata import sample_metadata

        metadata = sample_metadata(samples, train.datasets, train_accessories, "dataset.train.datasets")
    return LoaderBundle(loader, samples, skipped, global_batch=train.batch_size * world_size * accumulate,
                        metadata=metadata)  # fmt: skip


def _balanced_sampler(train, kinds: list[str], captions: list[str] | None, seed: int, rank: int, world_size: int):
    """TAO's unique-caption batches when asked and possible, else its weighted sampler (TAO's own fallback:
    a pairs row without a caption, or a batch smaller than the number of query types, gets a warning)."""
    if train.unique_caption_per_batch:
        if captions is None:
            log.warning("dataset.train.unique_caption_per_batch: a train_pairs_file row has no caption: balancing "
                        "query types without unique-caption batches")  # fmt: skip
        else:
            try:
                sampler = UniqueCaptionBatchSampler(kinds, captions, train.batch_size, seed, rank, world_size)
            except ValueError as exc:
                log.warning("dataset.train.unique_caption_per_batch: %s: balancing query types without "
                            "unique-caption batches", exc)  # fmt: skip
            else:
                if sampler.batches_per_rank == 0:
                    raise DataError(
                        f"dataset.train.unique_caption_per_batch: not one batch of {train.batch_size} a process "
                        f"with quotas {dict(zip(sampler.order, sampler.quotas))} and no caption twice fits these "
                        "rows: lower dataset.train.batch_size or set unique_caption_per_batch=false"
                    )
                log.info("dataset.train.unique_caption_per_batch: %d batches a process an epoch, quotas %s",
                         sampler.batches_per_rank, dict(zip(sampler.order, sampler.quotas)))  # fmt: skip
                return sampler
    return BalancedQueryTypeSampler(kinds, seed, rank, world_size)


def build_val_loader(
    data_cfg: DatasetConfig, preprocess: Preprocess, tokenizer: Callable | None, pin_memory: bool = True
) -> LoaderBundle | None:
    """``dataset.val`` as custom folders or shards (by ``dataset.val.type``); ``None`` when it is not set."""
    val = data_cfg.val
    if val.type == "wds":
        return build_wds_eval_loader(val.wds, "dataset.val.wds", preprocess, tokenizer, val.batch_size,
                                     val.num_workers, pin_memory)  # fmt: skip
    if not val.datasets:
        return None
    return build_eval_loader(val.datasets, "dataset.val.datasets", preprocess, tokenizer, val.batch_size,
                             val.num_workers, pin_memory)  # fmt: skip


def build_wds_eval_loader(
    wds_cfg,
    section: str,
    preprocess: Preprocess,
    tokenizer: Callable | None,
    batch_size: int,
    num_workers: int,
    pin_memory: bool = True,
) -> LoaderBundle:
    """Every usable sample of the shards of ``wds_cfg`` once, un-augmented (for validation and evaluate)."""
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} of {section} must be >= 1")
    shards = wds.list_shards(wds_cfg, section)
    workers = min(effective_workers(num_workers, f"{section.rsplit('.', 1)[0]}.num_workers"), len(shards))
    stream = wds.WdsEvalStream(shards, build_eval_transform(preprocess), tokenizer, _Bad)
    loader = DataLoader(
        stream,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=functools.partial(collate_skipping_bad, stack=batch_stacker(preprocess)),
        pin_memory=pin_memory and torch.cuda.is_available(),
        worker_init_fn=init_worker,
    )
    return LoaderBundle(loader, [], SkipCounter(), kind="wds",
                        num_samples=wds.epoch_samples(shards, wds_cfg.samples_per_shard))  # fmt: skip


def build_eval_loader(
    entries: Sequence[DatasetEntry],
    section: str,
    preprocess: Preprocess,
    tokenizer: Callable | None,
    batch_size: int,
    num_workers: int,
    pin_memory: bool = True,
    require_captions: bool = True,
) -> LoaderBundle:
    """Un-augmented batches in dataset order; image-only when ``require_captions`` is false."""
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} of {section} must be >= 1")
    samples, skipped = scan_custom_datasets(entries, section, require_captions=require_captions)
    dataset = ImageTextDataset(samples, build_eval_transform(preprocess), tokenizer if require_captions else None)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=effective_workers(num_workers, f"{section.rsplit('.', 1)[0]}.num_workers"),
        collate_fn=functools.partial(collate_skipping_bad, stack=batch_stacker(preprocess)),
        pin_memory=pin_memory and torch.cuda.is_available(),
        worker_init_fn=init_worker,
    )
    return LoaderBundle(loader, samples, skipped)
