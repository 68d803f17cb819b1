"""WebDataset shards (TAO's ``type: wds``): ``.tar`` files of ``<key>.<ext>`` members, local or on S3.

Reading is webdataset's own (``tar_file_iterator`` + ``group_by_keys``), so shards written by
``webdataset.ShardWriter``, by ``img2dataset`` and by plain GNU ``tar`` all work. A sample pairs an image
(``jpg jpeg png webp``) with a caption (``txt text``) and, for training, optional hard-negative captions
(``neg.txt``, one a line); anything else in a shard is ignored.

Training epochs are explicit: ``epoch_samples`` (real counts from ``sizes.json`` / ``_info.json`` /
img2dataset's ``*_stats.json`` when present, else ``samples_per_shard x shards``) divided by the global batch.
The epoch's shards, in an order reshuffled every epoch from ``seed + epoch``, are dealt to a fixed number of
canonical sample streams (:class:`StreamPlan`; ``wds.streams``, by default a function of the shard count and
the global batch), and every global step takes the same number of samples from every stream. Processes and
loader workers only choose who reads which streams, so the samples of a step do not depend on them. A
stream that runs out of samples before the epoch ends starts another pass over its shards.

The last batch of each step carries where the process's streams stand (pass, shard, sample offset, samples
yielded), which the trainer checkpoints; a resumed run, on any number of processes and workers, reopens
each stream's shard and continues with the next sample.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import IterableDataset, get_worker_info

from clip_tao.config.schema import WdsConfig
from clip_tao.data import step_buffers
from clip_tao.data.custom import SkipCounter
from clip_tao.data.pairs import (
    NO_PAIRS,
    PairOptions,
    draw_negatives,
    join_pair_fields,
    pair_fields,
    parse_negatives,
    slice_pair_fields,
)
from clip_tao.data.s3 import is_s3_url, open_s3, parse_s3_url, read_s3_bytes, redact_url
from clip_tao.data.step_buffers import StepBuffers
from clip_tao.data.walk import walk_files_once
from clip_tao.errors import DataError
from clip_tao.models.patches import PatchBudgetError
from clip_tao.pair_losses import bytes_id, text_id

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("txt", "text")
NEGATIVES_KEY = "neg.txt"  # hard-negative captions of the sample, one a line
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# Errors of a shard that ends early or is corrupt: the rest of the shard is skipped, never the run.
SHARD_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError, DataError)


@dataclass(frozen=True)
class Shard:
    url: str  # a local path or an s3:// URL
    num_samples: int | None  # the real count when a sizes file says so

    @property
    def name(self) -> str:
        """For logs: local path, or ``s3://bucket/key`` without the query string."""
        return parse_s3_url(self.url).name if is_s3_url(self.url) else self.url


# -- finding shards ---------------------------------------------------------------------------------
def list_shards(cfg: WdsConfig, section: str) -> list[Shard]:
    """The shards of ``cfg`` (``shard_list_file`` if set, else every shard under ``root_dir``), with sizes."""
    if cfg.shard_list_file:
        urls = _read_shard_list(cfg, section)
    elif cfg.root_dir:
        if is_s3_url(cfg.root_dir):
            raise DataError(
                f"{section}.root_dir {cfg.root_dir!r}: S3 shards are listed in {section}.shard_list_file, "
                "one s3:// URL a line (brace expansion allowed)"
            )
        if not os.path.isdir(cfg.root_dir):
            raise DataError(f"{section}.root_dir {cfg.root_dir!r} does not exist or is not a folder")
        urls = [
            os.path.join(cfg.root_dir, rel) for rel in walk_files_once(cfg.root_dir) if rel.endswith(SHARD_SUFFIXES)
        ]
        if not urls:
            raise DataError(f"{section}.root_dir {cfg.root_dir!r} holds no .tar shards")
    else:
        raise DataError(f"{section}: set root_dir (a folder of .tar shards) or shard_list_file")
    if cfg.samples_per_shard < 1:
        raise DataError(f"{section}.samples_per_shard={cfg.samples_per_shard} must be >= 1")
    sizes = _known_sizes(urls)
    return [Shard(url, sizes.get(url)) for url in urls]


def _read_shard_list(cfg: WdsConfig, section: str) -> list[str]:
    import braceexpand

    path = cfg.shard_list_file
    if not os.path.isfile(path):
        raise DataError(f"{section}.shard_list_file {path!r} does not exist")
    base = cfg.root_dir or os.path.dirname(os.path.abspath(path))
    urls = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                items = list(braceexpand.braceexpand(line))
            except braceexpand.UnbalancedBracesError:
                # Never echo the line: its query string or user part may hold a secret.
                raise DataError(
                    f"{section}.shard_list_file {path!r} line {number} ({redact_url(line)}): unbalanced braces; "
                    "write ranges as {000000..000099}"
                ) from None
            for item in items:
                if is_s3_url(item):
                    try:
                        parse_s3_url(item)  # refuse bad or credential-carrying URLs up front
                    except DataError as exc:
                        raise DataError(f"{section}.shard_list_file {path!r} line {number}: {exc}") from None
                    urls.append(item)
                    continue
                local = item if os.path.isabs(item) else os.path.join(base, item)
                if not os.path.isfile(local):
                    raise DataError(f"{section}.shard_list_file {path!r}: shard {local!r} does not exist")
                urls.append(local)
    if not urls:
        raise DataError(f"{section}.shard_list_file {path!r} lists no shards")
    return urls


def _known_sizes(urls: Sequence[str]) -> dict[str, int]:
    """Sample counts from ``sizes.json`` (open_clip), ``_info.json`` (wids) or ``<shard>_stats.json`` (img2dataset)."""
    sizes: dict[str, int] = {}
    folders: dict[str, dict[str, int]] = {}
    for url in urls:
        folder, name = _split(url)
        if folder not in folders:
            folders[folder] = _folder_sizes(folder, url)
        counts = folders[folder]
        if name in counts:
            sizes[url] = counts[name]
        elif not is_s3_url(url):
            stats = os.path.join(folder, name.split(".", 1)[0] + "_stats.json")
            count = _json_file(stats).get("successes")
            if isinstance(count, int):
                sizes[url] = count
    return sizes


def _split(url: str) -> tuple[str, str]:
    """(folder, file name) of a path or an s3:// URL, keeping an S3 URL's query on the folder."""
    if is_s3_url(url):
        body, _, query = url.partition("?")
        folder, _, name = body.rpartition("/")
        return folder + ("?" + query if query else ""), name
    return os.path.dirname(url), os.path.basename(url)


def _folder_sizes(folder: str, example_url: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for meta in ("sizes.json", "_info.json"):
        if is_s3_url(example_url):
            body, _, query = folder.partition("?")
            try:
                data = json.loads(read_s3_bytes(f"{body}/{meta}" + (f"?{query}" if query else "")))
            except Exception:  # no such object: sizes are optional
                data = {}
        else:
            data = _json_file(os.path.join(folder, meta))
        if meta == "sizes.json":
            counts.update({os.path.basename(k): int(v) for k, v in data.items() if isinstance(v, int)})
        else:
            for entry in data.get("shardlist", []):
                if isinstance(entry, dict) and "url" in entry and isinstance(entry.get("nsamples"), int):
                    counts[os.path.basename(entry["url"])] = entry["nsamples"]
    return counts


def _json_file(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def epoch_samples(shards: Sequence[Shard], samples_per_shard: int) -> int:
    """Samples in one epoch: the real count where known, ``samples_per_shard`` for the other shards."""
    return sum(s.num_samples if s.num_samples is not None else samples_per_shard for s in shards)


# -- reading one shard ------------------------------------------------------------------------------
def open_shard(url: str):
    return open_s3(url) if is_s3_url(url) else open(url, "rb")


def iter_raw_samples(shard: Shard, skipped: SkipCounter) -> Iterator[dict]:
    """The grouped samples of one shard (``{"__key__", "jpg", "txt", ...}`` as bytes), in tar order.

    A shard that cannot be opened is logged by name and counted (``unreadable_shard``); one that ends
    early or is corrupt yields what it has and is counted (``truncated_shard``).
    """
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    def reraise(exc: Exception) -> bool:
        raise exc

    try:
        stream = open_shard(shard.url)
    except DataError as exc:  # already names the shard
        _warn_once(shard, f"{exc}: shard skipped")
        skipped["unreadable_shard"] += 1
        return
    except OSError as exc:
        _warn_once(shard, f"shard {shard.name} cannot be opened ({exc}): skipped")
        skipped["unreadable_shard"] += 1
        return
    read = 0

    def members():
        nonlocal read
        for member in tar_file_iterator(stream, handler=reraise):
            read += 1
            yield {**member, "__url__": shard.url}

    try:
        yield from group_by_keys(members(), handler=reraise)
    except SHARD_ERRORS as exc:
        if read == 0:  # not a tar file at all (or empty): the whole shard is unusable
            _warn_once(shard, f"shard {shard.name} cannot be read as a tar file ({exc}): skipped")
            skipped["unreadable_shard"] += 1
        else:
            _warn_once(shard, f"shard {shard.name} is truncated or corrupt ({exc}): the rest of it is skipped")
            skipped["truncated_shard"] += 1
    finally:
        stream.close()


_warned: set[str] = set()


def _warn_once(shard: Shard, message: str) -> None:
    """Log a shard's problem once a process (it is counted every time it is met)."""
    if shard.url not in _warned:
        _warned.add(shard.url)
        log.warning("%s", message)


def open_rgb(source, draft_side: int | None = None) -> Image.Image:
    """Decode ``source`` (a path or file object) to RGB.

    With ``draft_side``, a JPEG much larger than needed is decoded at 1/2, 1/4 or 1/8 scale by libjpeg
    itself (``Image.draft``), never below ``draft_side`` on either side: far less work for large photos,
    and no loss when ``draft_side`` is at least the smallest crop the augmentation can take.
    """
    with Image.open(source) as image:
        if draft_side and image.format == "JPEG":
            image.draft("RGB", (draft_side, draft_side))
        if image.mode == "RGB":  # decoded in place: converting would only copy it
            image.load()
            return image
        return image.convert("RGB")


def draft_side_for(image_size: int, min_scale: float) -> int:
    """The smallest source side whose smallest random crop (area ``min_scale``, aspect 3/4) still covers
    ``image_size`` pixels, so decoding at reduced scale never upsamples a training crop."""
    import math

    return math.ceil(image_size / math.sqrt(min_scale * 3 / 4))


def decode_pair(
    raw: dict, draft_side: int | None = None, require_caption: bool = True
) -> tuple[Image.Image | None, str | None, str | None]:
    """``(image, caption, None)`` or ``(None, None, reason)`` for a sample that must be skipped.

    With ``require_caption=False`` (embedding images only) captions are not read: ``caption`` is ``None``.
    """
    image_key = next((k for k in IMAGE_KEYS if k in raw), None)
    caption_key = next((k for k in CAPTION_KEYS if k in raw), None)
    if image_key is None:
        return None, None, "missing_image"
    caption = None
    if require_caption:
        if caption_key is None:
            return None, None, "missing_caption"
        try:
            caption = raw[caption_key].decode("utf-8-sig").strip()
        except UnicodeDecodeError:
            return None, None, "caption_not_utf8"
        if not caption:
            return None, None, "empty_caption"
    try:
        return open_rgb(io.BytesIO(raw[image_key]), draft_side), caption, None
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None, None, "undecodable_image"


def sample_seed(*parts) -> int:
    """A 63-bit seed from the parts (stable across processes, unlike ``hash``)."""
    import hashlib

    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seeded_transform(
    transform: Callable, image: Image.Image, seed: int | None, keep_state: bool = True
) -> torch.Tensor:
    """``transform(image)`` with torch's CPU RNG seeded by ``seed`` (and restored after), so random
    augmentation depends on the sample, not on which worker or process happens to load it.
    ``keep_state=False`` leaves the restoring to the caller (:func:`default_generator_kept` around a batch)."""
    if seed is None:
        return transform(image)
    if not keep_state:
        torch.default_generator.manual_seed(seed)
        return transform(image)
    with default_generator_kept() as generator:
        generator.manual_seed(seed)
        return transform(image)


@contextlib.contextmanager
def default_generator_kept() -> Iterator[torch.Generator]:
    """Torch's default CPU generator, put back as it was when the block ends.

    torchvision's random transforms draw from it. Seeding it directly costs about 1 us, where
    torch.manual_seed / fork_rng also touch every device (~100 us a sample); saving and restoring its state
    copies 5 KB each way, so a batch does it once for all its samples.
    """
    generator = torch.default_generator
    saved = generator.get_state()
    try:
        yield generator
    finally:
        generator.set_state(saved)


# -- training: canonical streams, independent of the processes and workers -----------------------
MAX_DEFAULT_STREAMS = 128


def default_streams(num_shards: int, global_batch: int) -> int:
    """The number of sample streams when ``wds.streams`` is not set: the largest divisor of the global batch
    that is at most the shard count (and 128). A function of the data and the global batch only, so a run
    resumed on another number of processes or workers computes the same streams."""
    limit = max(1, min(num_shards, global_batch, MAX_DEFAULT_STREAMS))
    return max(c for c in range(1, limit + 1) if global_batch % c == 0)


@dataclass
class StreamPlan:
    """How an epoch of shards is read, whatever the layout of the run.

    The epoch's shards (shuffled from ``seed + epoch``) are dealt to ``streams`` canonical streams; stream ``c``
    reads shards ``c, c + streams, ...`` in that order, sample after sample. Global step ``s`` trains on samples
    ``[s * per_step, (s + 1) * per_step)`` of every stream, ``per_step = global_batch / streams``. Processes and
    loader workers only decide who reads which streams: rank ``r`` reads the streams ``c`` with
    ``c % world_size == r``, and its workers share those out in turn.
    """

    streams: int
    global_batch: int
    steps_per_epoch: int
    world_size: int
    workers: int  # DataLoader workers per rank (0: read in the training process)
    batch_size: int  # samples a loader batch (a micro-batch under gradient accumulation)

    @property
    def per_step(self) -> int:
        """Samples a stream gives each global step."""
        return self.global_batch // self.streams

    @property
    def readers_per_rank(self) -> int:
        return max(1, self.workers)

    @property
    def accumulate(self) -> int:
        return self.global_batch // (self.batch_size * self.world_size)

    def rank_streams(self, rank: int) -> list[int]:
        return list(range(rank, self.streams, self.world_size))

    def reader_streams(self, rank: int, reader: int) -> list[int]:
        return self.rank_streams(rank)[reader :: self.readers_per_rank]


def plan_streams(
    shards: Sequence[Shard],
    total: int,
    batch_size: int,
    world_size: int,
    workers: int,
    section: str,
    accumulate: int = 1,
    streams: int | None = None,
) -> StreamPlan:
    """The plan for this run, or one line on what cannot work and the counts that do."""
    global_batch = batch_size * world_size * accumulate
    if streams is None:
        streams = default_streams(len(shards), global_batch)
    elif streams < 1:
        raise DataError(f"{section}.streams={streams} must be >= 1 (or null: chosen from the shards and batch)")
    if len(shards) < streams:
        raise DataError(
            f"{section}: {len(shards)} shard(s) for {section}.streams={streams}: every stream needs a shard of its "
            f"own; write at least {streams} shards or lower {section}.streams"
        )
    if global_batch % streams:
        fitting = [c for c in range(1, min(len(shards), global_batch) + 1) if global_batch % c == 0]
        raise DataError(
            f"{section}: the global batch {global_batch} (batch_size {batch_size} x {world_size} process(es) x "
            f"{accumulate} accumulated) is not a multiple of {section}.streams={streams}; streams that work: "
            f"{', '.join(map(str, fitting[-6:]))}"
        )
    if streams % world_size:
        counts = [n for n in range(1, streams + 1) if streams % n == 0 and global_batch % n == 0]
        raise DataError(
            f"{section}: {streams} sample streams cannot be split over {world_size} processes; at the global batch "
            f"{global_batch}, process counts that work are {', '.join(map(str, counts))} (or set {section}.streams, "
            f"with at least that many shards: {world_size} processes need at least {world_size} shards)"
        )
    per_rank = streams // world_size
    if workers > per_rank:
        log.info("%s: %d sample streams for %d process(es): %d loader workers a process instead of %d", section,
                 streams, world_size, per_rank, workers)  # fmt: skip
        workers = per_rank
    steps = total // global_batch
    if steps < 1:
        raise DataError(
            f"{section}: an epoch of {total} samples is smaller than the global batch {global_batch} (batch_size "
            f"{batch_size} x {world_size} process(es) x {accumulate} accumulated); lower the batch size or add data"
        )
    return StreamPlan(streams, global_batch, steps, world_size, workers, batch_size)


class _StreamReader:
    """One canonical stream: its shards in order, decoded sample after sample, with its position."""

    def __init__(self, owner: WdsTrainStream, stream: int, start: dict | None):
        self.owner = owner
        self.stream = stream
        self.position = dict(start) if start else {"pass": 0, "shard": 0, "offset": 0, "yielded": 0}
        self.shards = owner.stream_shards(stream, borrowed=self.position.get("borrowed", False))
        self.skipped = SkipCounter()
        self._items = self._read()

    def take(self, count: int) -> list[dict]:
        return [next(self._items) for _ in range(count)]

    def _read(self) -> Iterator[dict]:
        position, shards = self.position, self.shards
        while True:
            good_this_pass = position["yielded"] > 0 or position["shard"] > 0
            for shard_index in range(position["shard"], len(shards)):
                shard = shards[shard_index]
                first = position["offset"] if shard_index == position["shard"] else 0
                for offset, raw in enumerate(iter_raw_samples(shard, self.skipped)):
                    if offset < first:
                        continue  # consumed before the checkpoint
                    item = self.owner.decode(raw, shard, position["pass"], self.skipped)
                    position.update(shard=shard_index, offset=offset + 1)
                    if item is None:
                        continue
                    good_this_pass = True
                    position["yielded"] += 1
                    yield item
                position.update(shard=shard_index + 1, offset=0)
            if not good_this_pass and position.get("borrowed"):
                names = ", ".join(s.name for s in shards[:3])
                raise DataError(f"no usable sample in shard(s) {names}{' ...' if len(shards) > 3 else ''}")
            if not good_this_pass:
                # Every shard of this stream is unusable: it reads all the epoch's shards instead, starting with
                # the next stream's (a function of the data, so every layout does the same).
                log.warning("sample stream %d has no usable sample in its shards (%s ...): it reads the other "
                            "streams' shards", self.stream, shards[0].name)  # fmt: skip
                position["borrowed"] = True
                self.shards = shards = self.owner.stream_shards(self.stream, borrowed=True)
            # An epoch asks a stream for as many samples as it needs: another pass over its shards.
            position.update({"pass": position["pass"] + 1, "shard": 0, "offset": 0})


class WdsTrainStream(IterableDataset):
    """Yields, for each global step, one chunk from each loader worker of this rank: ``per_step`` augmented
    samples of each of the worker's streams (see :class:`StreamPlan`). :func:`regroup_steps` joins a step's
    chunks and cuts them into the rank's loader batches.

    Before iterating an epoch, set ``epoch``, ``start_step`` and, to resume mid-epoch, ``resume`` (stream
    positions from a checkpoint, keyed by stream number).
    """

    def __init__(
        self,
        shards: Sequence[Shard],
        plan: StreamPlan,
        rank: int,
        transform: Callable,
        tokenizer: Callable,
        seed: int,
        draft_side: int | None = None,
        stack: Callable = torch.stack,
        pairs: PairOptions = NO_PAIRS,
    ):
        self.shards = list(shards)
        self.pairs = pairs  # hard negatives (neg.txt members) and image content ids
        self.draft_side = draft_side
        self.stack = stack  # torch.stack, or NaFlex's patch batching
        self.plan = plan
        self.rank = rank
        self.transform = transform
        self.tokenizer = tokenizer
        self.seed = seed
        self.epoch = 0
        self.start_step = 0
        self.resume: dict[str, dict] | None = None
        self.buffers: StepBuffers | None = None  # set for an epoch by LoaderBundle.batches

    def __len__(self) -> int:
        return (self.plan.steps_per_epoch - self.start_step) * self.plan.readers_per_rank

    def stream_shards(self, stream: int, borrowed: bool = False) -> list[Shard]:
        """The shards of ``stream`` this epoch; ``borrowed``: every shard, from the next stream's first one."""
        order = list(self.shards)
        random.Random(self.seed + self.epoch).shuffle(order)
        if borrowed:
            return order[stream + 1 :] + order[: stream + 1]
        return order[stream :: self.plan.streams]

    def make_step_buffers(self) -> StepBuffers | None:
        """Shared step buffers for this epoch's workers (:mod:`clip_tao.data.step_buffers`); ``None`` where a
        step has one share (no join) or its pixels are not fixed-size tensors (NaFlex patches)."""
        if self.plan.readers_per_rank < 2 or self.stack is not torch.stack or not step_buffers.available():
            return None
        probe = seeded_transform(self.transform, Image.new("RGB", (32, 32)), 0)
        rows = self.plan.batch_size * self.plan.accumulate
        return StepBuffers(rows, tuple(probe.shape), probe.dtype, self.start_step)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        reader = info.id if info is not None else 0
        resume = self.resume or {}
        readers = [_StreamReader(self, c, resume.get(str(c))) for c in self.plan.reader_streams(self.rank, reader)]
        # This worker's rows in a step: after the shares of the workers before it.
        offset = self.plan.per_step * sum(len(self.plan.reader_streams(self.rank, r)) for r in range(reader))
        for step in range(self.start_step, self.plan.steps_per_epoch):
            items = [item for r in readers for item in r.take(self.plan.per_step)]
            skipped = SkipCounter()
            for r in readers:
                skipped.update(r.skipped)
                r.skipped.clear()  # the shard reader holds this counter: clear it, never replace it
            positions = {str(r.stream): dict(r.position) for r in readers}
            out = self.buffers.claim(step, offset, len(items)) if self.buffers is not None else None
            yield _collate(items, skipped, positions, self.tokenizer, self.stack, self.pairs.negatives_per_sample,
                           out)  # fmt: skip

    def decode(self, raw: dict, shard: Shard, pass_index: int, skipped: SkipCounter) -> dict | None:
        image, caption, problem = decode_pair(raw, self.draft_side)
        if problem:
            skipped[problem] += 1
            return None
        key = f"{os.path.basename(shard.name)}/{raw['__key__']}"
        seed = sample_seed(self.seed, self.epoch, pass_index, shard.name, raw["__key__"])
        try:
            pixels = seeded_transform(self.transform, image, seed)
        except PatchBudgetError as exc:
            log.warning("%s: %s; skipped", key, exc)
            skipped[PatchBudgetError.reason] += 1
            return None
        item = {"pixels": pixels, "caption": caption, "key": key}
        if self.pairs.enabled:
            negatives: tuple[str, ...] = ()
            if NEGATIVES_KEY in raw:
                negatives, problem = parse_negatives(raw[NEGATIVES_KEY])
                if problem:
                    skipped[problem] += 1
            image_bytes = next(raw[k] for k in IMAGE_KEYS if k in raw)
            item["captions"] = (caption,)
            item["image_id"] = bytes_id(image_bytes) if self.pairs.hash_images else text_id(key)
            item["negatives"] = draw_negatives(negatives, self.pairs.negatives_per_sample,
                                               sample_seed(seed, "negatives"))  # fmt: skip
        return item


def regroup_steps(
    chunks: Iterator[dict], plan: StreamPlan, pin: bool = False, buffers: StepBuffers | None = None
) -> Iterator[dict]:
    """The rank's loader batches from the workers' chunks: a step's chunks (one from each worker, which the
    DataLoader delivers in turn) joined, then cut into ``accumulate`` batches of ``batch_size``. The last batch
    of a step carries ``position``: every stream of this rank after the step. With ``pin``, the join writes
    straight into pinned memory (the one copy the DataLoader's pinning would otherwise make of each chunk).
    With ``buffers``, the workers wrote the pixels into the step's shared buffer: only the rest is joined."""
    chunks = iter(chunks)
    try:
        yield from _regroup(chunks, plan, pin, buffers)
    finally:  # closing the batches closes the loader's iteration too: its workers stop in ordinary code
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def _regroup(chunks: Iterator[dict], plan: StreamPlan, pin: bool, buffers: StepBuffers | None) -> Iterator[dict]:
    number = buffers.first_step if buffers is not None else 0
    while True:
        if buffers is not None:
            buffers.release_free()
        step = []
        for _ in range(plan.readers_per_rank):
            try:
                step.append(next(chunks))
            except StopIteration:
                if step:
                    raise DataError("a loader worker ended in the middle of a step") from None
                return
        pixels = None
        if buffers is not None:
            pixels = buffers.pixels(number, [c["pixels"] for c in step], [len(c["keys"]) for c in step])
        joined = step[0] if len(step) == 1 else _join(step, pin, pixels)
        size = plan.batch_size
        for k in range(plan.accumulate):
            last = k == plan.accumulate - 1
            part = joined if plan.accumulate == 1 else _slice(joined, k * size, (k + 1) * size, last)
            if last:
                part["position"] = {key: pos for chunk in step for key, pos in chunk["position"].items()}
            elif "position" in part:
                del part["position"]
            yield part
        # From here only the training loop holds the step's pixels: its buffer is free once it lets them go.
        joined = part = pixels = None
        number += 1


def _join(chunks: list[dict], pin: bool = False, pixels: torch.Tensor | None = None) -> dict:
    from clip_tao.models.patches import PatchBatch, concat_patch_batches

    def cat(tensors: list[torch.Tensor]) -> torch.Tensor:
        if not pin:
            return torch.cat(tensors)
        shape = (sum(len(t) for t in tensors), *tensors[0].shape[1:])
        return torch.cat(tensors, out=torch.empty(shape, dtype=tensors[0].dtype, pin_memory=True))

    skipped = SkipCounter()
    for c in chunks:
        skipped.update(c["skipped"])
    shares = [c["pixels"] for c in chunks]
    if pixels is not None:  # already whole: the workers wrote the step's buffer
        joined = pixels
    elif isinstance(shares[0], PatchBatch):
        joined = concat_patch_batches(shares)
        joined = joined.pin_memory() if pin else joined
    else:
        joined = cat(shares)
    return {
        **join_pair_fields(chunks),
        "pixels": joined,
        "input_ids": cat([c["input_ids"] for c in chunks]),
        "keys": [k for c in chunks for k in c["keys"]],
        "indices": torch.cat([c["indices"] for c in chunks]),
        "skipped": skipped,
        "position": {},
    }


def _slice(batch: dict, start: int, stop: int, last: bool) -> dict:
    return {
        **slice_pair_fields(batch, start, stop),
        "pixels": batch["pixels"][start:stop],
        "input_ids": batch["input_ids"][start:stop],
        "keys": batch["keys"][start:stop],
        "indices": batch["indices"][start:stop],
        # a step's skips are counted once, with its last batch
        "skipped": batch["skipped"] if last else SkipCounter(),
    }


def _collate(
    items: list[dict],
    skipped: SkipCounter,
    positions: dict,
    tokenizer: Callable,
    stack: Callable = torch.stack,
    negatives_per_sample: int = 0,
    out: torch.Tensor | None = None,
) -> dict:
    """A worker's chunk; with ``out`` (its rows of the step's shared buffer) the pixels go there, and the
    chunk's ``pixels`` is ``None``."""
    pairs = pair_fields(items, tokenizer, negatives_per_sample) if "negatives" in items[0] else {}
    if out is not None:
        torch.stack([i["pixels"] for i in items], out=out)
    return {
        **pairs,
        "pixels": None if out is not None else stack([i["pixels"] for i in items]),
        "input_ids": tokenizer([i["caption"] for i in items]),  # a batch at once: cheaper than one by one
        "keys": [i["key"] for i in items],
        "indices": torch.arange(len(items)),
        # A plain dict: the DataLoader's default_convert (and pin_memory) copy a mapping and update() the
        # copy, which for a Counter adds the counts a second time.
        "skipped": dict(skipped),
        "position": positions,
    }


# -- evaluation: every sample once ------------------------------------------------------------------
class WdsEvalStream(IterableDataset):
    """Every usable sample of the shards once, un-augmented; worker ``w`` reads shards ``w, w+K, ...``.

    Items are single samples (batched by the DataLoader with :func:`collate_skipping_bad`); a skipped
    sample comes through as the loaders' "bad" marker so it is counted in the batch.
    """

    def __init__(self, shards: Sequence[Shard], transform: Callable, tokenizer: Callable | None, bad: Callable):
        self.shards = list(shards)
        self.transform = transform
        self.tokenizer = tokenizer
        self.bad = bad

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        count = 0
        for shard in self.shards[worker::workers]:
            skipped = SkipCounter()
            for raw in iter_raw_samples(shard, skipped):
                image, caption, problem = decode_pair(raw)
                if problem:
                    yield self.bad(problem)
                    continue
                try:
                    pixels = self.transform(image)
                except PatchBudgetError as exc:
                    log.warning("%s: %s; skipped", raw["__key__"], exc)
                    yield self.bad(PatchBudgetError.reason)
                    continue
                item = {
                    "pixels": pixels,
                    # Unique across workers (not dense): the n-th sample of worker w.
                    "index": count * workers + worker,
                    "key": f"{os.path.basename(shard.name)}/{raw['__key__']}",
                }
                if self.tokenizer is not None:
                    item["input_ids"] = self.tokenizer([caption])[0]
                count += 1
                yield item
            for reason, n in skipped.items():  # shard-level problems reach the batch counts too
                for _ in range(n):
                    yield self.bad(reason)
