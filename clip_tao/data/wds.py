"""WebDataset shards (TAO's ``type: wds``): ``.tar`` files of ``<key>.<ext>`` members, local or on S3.

Reading is webdataset's own (``tar_file_iterator`` + ``group_by_keys``), so shards written by
``webdataset.ShardWriter``, by ``img2dataset`` and by plain GNU ``tar`` all work. A sample pairs an image
(``jpg jpeg png webp``) with a caption (``txt text``); anything else in a shard is ignored.

Training epochs are explicit: ``epoch_samples`` (real counts from ``sizes.json`` / ``_info.json`` /
img2dataset's ``*_stats.json`` when present, else ``samples_per_shard x shards``) are split into equal
quotas over every (rank, worker) *slot*, so all ranks run the same number of steps. Each slot reads its
own shards, in an order reshuffled every epoch from ``seed + epoch``; a slot that runs out of samples
before its quota starts another pass over its shards, one that has more stops at the quota.

Each batch carries the position its slot reached (pass, shard, sample offset, samples yielded), which the
trainer checkpoints; a resumed worker reopens that shard and continues with the next sample.
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
from clip_tao.data.custom import SkipCounter
from clip_tao.data.s3 import is_s3_url, open_s3, parse_s3_url, read_s3_bytes, redact_url
from clip_tao.data.walk import walk_files_once
from clip_tao.errors import DataError
from clip_tao.models.patches import PatchBudgetError

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("txt", "text")
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


def decode_pair(raw: dict, draft_side: int | None = None) -> tuple[Image.Image | None, str | None, str | None]:
    """``(image, caption, None)`` or ``(None, None, reason)`` for a sample that must be skipped."""
    image_key = next((k for k in IMAGE_KEYS if k in raw), None)
    caption_key = next((k for k in CAPTION_KEYS if k in raw), None)
    if image_key is None:
        return None, None, "missing_image"
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


# -- training: equal quotas over (rank, worker) slots -----------------------------------------------
@dataclass
class SlotPlan:
    """How an epoch is split: ``num_slots = world_size x workers``, each slot yields ``batches_per_slot``."""

    world_size: int
    workers: int  # DataLoader workers per rank (0 counts as one in-process slot)
    batch_size: int
    batches_per_slot: int

    @property
    def slots_per_rank(self) -> int:
        return max(1, self.workers)

    @property
    def batches_per_rank(self) -> int:
        return self.batches_per_slot * self.slots_per_rank


def plan_slots(
    shards: Sequence[Shard], total: int, batch_size: int, world_size: int, workers: int, section: str
) -> SlotPlan:
    """Every slot needs a shard of its own; workers are reduced to fit the shards, never ranks."""
    if len(shards) < world_size:
        raise DataError(
            f"{section}: {len(shards)} shard(s) cannot be split over {world_size} ranks; "
            "write at least one shard per rank (more shards than ranks x workers is best)"
        )
    if workers > 0 and len(shards) < world_size * workers:
        fitted = len(shards) // world_size
        log.info("%s: %d shards for %d ranks: %d loader workers per rank instead of %d", section,
                 len(shards), world_size, fitted, workers)  # fmt: skip
        workers = fitted
    slots = world_size * max(1, workers)
    per_slot = total // slots // batch_size
    if per_slot < 1:
        raise DataError(
            f"{section}: an epoch of {total} samples is too small for {world_size} rank(s) x {max(1, workers)} "
            f"worker(s) x batch_size {batch_size}; lower the batch size or workers, or add data"
        )
    return SlotPlan(world_size, workers, batch_size, per_slot)


class WdsTrainStream(IterableDataset):
    """Yields whole, augmented batches for one rank; each worker serves its own slot (see module doc).

    Before iterating an epoch, set ``epoch``, and to resume mid-epoch ``resume`` (per-worker positions
    from a checkpoint) and ``rotation`` (batches already consumed on this rank, modulo the workers: the
    DataLoader always asks worker 0 first, so worker ids are rotated to continue the round robin).
    """

    def __init__(
        self,
        shards: Sequence[Shard],
        plan: SlotPlan,
        rank: int,
        transform: Callable,
        tokenizer: Callable,
        seed: int,
        draft_side: int | None = None,
        stack: Callable = torch.stack,
    ):
        self.shards = list(shards)
        self.draft_side = draft_side
        self.stack = stack  # torch.stack, or NaFlex's patch batching
        self.plan = plan
        self.rank = rank
        self.transform = transform
        self.tokenizer = tokenizer
        self.seed = seed
        self.epoch = 0
        self.resume: list[dict] | None = None
        self.rotation = 0

    def __len__(self) -> int:
        return self.plan.batches_per_rank

    def slot_shards(self, worker: int) -> list[Shard]:
        order = list(self.shards)
        random.Random(self.seed + self.epoch).shuffle(order)
        slots = self.plan.world_size * self.plan.slots_per_rank
        return order[self.rank * self.plan.slots_per_rank + worker :: slots]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        worker = (physical + self.rotation) % self.plan.slots_per_rank
        # A worker with no recorded position had not delivered a batch yet: it starts at the beginning.
        start = self.resume[worker] if self.resume and worker < len(self.resume) and self.resume[worker] else None
        yield from self._slot_batches(worker, start)

    def _slot_batches(self, worker: int, start: dict | None) -> Iterator[dict]:
        shards = self.slot_shards(worker)
        quota = self.plan.batches_per_slot * self.plan.batch_size
        position = dict(start) if start else {"pass": 0, "shard": 0, "offset": 0, "yielded": 0}
        pending: list[dict] = []
        skipped = SkipCounter()
        while position["yielded"] < quota:
            good_this_pass = position["yielded"] > 0 or position["shard"] > 0
            for shard_index in range(position["shard"], len(shards)):
                shard = shards[shard_index]
                first = position["offset"] if shard_index == position["shard"] else 0
                for offset, raw in enumerate(iter_raw_samples(shard, skipped)):
                    if offset < first:
                        continue  # consumed before the checkpoint
                    item = self._decode(raw, shard, position["pass"], skipped)
                    position.update(shard=shard_index, offset=offset + 1)
                    if item is None:
                        continue
                    good_this_pass = True
                    pending.append(item)
                    position["yielded"] += 1
                    if len(pending) == self.plan.batch_size:
                        yield _collate(pending, skipped, {"worker": worker, **position}, self.tokenizer, self.stack)
                        pending = []
                        skipped.clear()  # the shard reader holds this counter: clear it, never replace it
                    if position["yielded"] >= quota:
                        return
                position.update(shard=shard_index + 1, offset=0)
            if not good_this_pass:
                names = ", ".join(s.name for s in shards[:3])
                raise DataError(f"no usable sample in shard(s) {names}{' ...' if len(shards) > 3 else ''}")
            # Quota not reached: another pass over this slot's shards (uneven or estimated shard sizes).
            position.update({"pass": position["pass"] + 1, "shard": 0, "offset": 0})

    def _decode(self, raw: dict, shard: Shard, pass_index: int, skipped: SkipCounter) -> dict | None:
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
        return {"pixels": pixels, "caption": caption, "key": key}


def _collate(
    items: list[dict], skipped: SkipCounter, position: dict, tokenizer: Callable, stack: Callable = torch.stack
) -> dict:
    return {
        "pixels": stack([i["pixels"] for i in items]),
        "input_ids": tokenizer([i["caption"] for i in items]),  # a batch at once: cheaper than one by one
        "keys": [i["key"] for i in items],
        "indices": torch.arange(position["yielded"] - len(items), position["yielded"]),
        "skipped": SkipCounter(skipped),
        "position": position,
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
