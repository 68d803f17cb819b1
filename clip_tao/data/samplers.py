"""Training samplers over custom data: which sample indices an epoch trains on, in what order, on each rank.

Every sampler's order for an epoch is fixed by ``dataset.seed`` and the epoch, so a run resumed in the middle of
an epoch (``start_index``: samples of this rank's share already trained) continues the same order.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """A permutation drawn from ``seed + epoch``: the same order for an epoch after any restart.

    With ``world_size`` ranks, rank ``r`` takes every ``world_size``-th index from position ``r`` of the
    permutation (the tail that does not divide evenly is dropped, so every rank gets the same count).
    ``start_index`` skips the first samples of this rank's share (resuming in the middle of an epoch).
    """

    def __init__(self, num_samples: int, seed: int, rank: int = 0, world_size: int = 1):
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_index = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def per_rank(self) -> int:
        return self.num_samples // self.world_size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator)[: self.per_rank * self.world_size]
        return iter(order[self.rank :: self.world_size][self.start_index :].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.start_index


class BalancedQueryTypeSampler(EpochShuffleSampler):
    """TAO 7.3's ``balance_query_types`` (its ``BalancedByQueryTypeSampler``): samples drawn with replacement,
    each weighted ``1 / count(its query_type)``, so every type has the same share of an epoch.

    One process draws ``N`` from all samples (generator seeded ``seed + epoch + 7919``); with several, each rank
    takes its slice of a ``seed + epoch`` permutation and draws as many from it. Slices are ``N // world`` long on
    every rank (TAO's last rank may be shorter, which leaves the ranks with unequal step counts). Each epoch's
    draw is fixed by the seed, so a resumed run skips to the same place (``start_index``).
    """

    def __init__(self, query_types: Sequence[str], seed: int, rank: int = 0, world_size: int = 1):
        super().__init__(len(query_types), seed, rank, world_size)
        counts: dict[str, int] = {}
        for kind in query_types:
            counts[kind] = counts.get(kind, 0) + 1
        self.weights = torch.tensor([1.0 / counts[kind] for kind in query_types], dtype=torch.float64)

    def __iter__(self):
        draw = torch.Generator().manual_seed(self.seed + self.epoch + 7919)
        if self.world_size == 1:
            picked = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=draw)
        else:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
            mine = order[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]
            picked = mine[torch.multinomial(self.weights[mine], self.per_rank, replacement=True, generator=draw)]
        return iter(picked[self.start_index :].tolist())


# TAO's quota order for its PAS query types; other types follow in order of first appearance.
PAS_QUERY_TYPES = ("easy", "medium", "hard", "natural_caption", "original_captions")


def query_type_order(query_types: Sequence[str]) -> tuple[str, ...]:
    """The types present, TAO's five PAS types first (in its order), then the others as they first appear."""
    present = dict.fromkeys(query_types)
    return tuple(t for t in PAS_QUERY_TYPES if t in present) + tuple(t for t in present if t not in PAS_QUERY_TYPES)


class UniqueCaptionBatchSampler(EpochShuffleSampler):
    """TAO 7.3's unique-caption batches (``balance_query_types`` with ``unique_caption_per_batch``, its
    ``BalancedUniqueCaptionBatchSampler``): every batch holds a fixed quota of each query type and never two rows
    with the same caption, so no valid pair of the batch is pushed apart as a negative.

    The epoch's batches are built once for all ranks, drawing without replacement from pools keyed by
    ``(query_type, caption)`` (``random.Random(seed + epoch)``, the same draws as TAO's, so the same batches);
    rows left when a type runs out of fresh captions are not trained that epoch. The batches are cut to a
    multiple of the ranks, shuffled (``seed + epoch + 7919``) and dealt round-robin. Every epoch trains as many
    batches as epoch 0 (later epochs can build a few more or fewer; TAO sizes its epochs from epoch 0 too).

    The sampler yields sample indices batch after batch; the loader's ``batch_size`` must be ``batch_size``
    (``drop_last`` keeps them whole). The batches depend on the per-process batch and the process count, so a
    run resumed on another layout is not the exact continuation (the trainer says so).
    """

    def __init__(self, query_types: Sequence[str], captions: Sequence[str], batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):  # fmt: skip
        super().__init__(len(query_types), seed, rank, world_size)
        if len(captions) != len(query_types):
            raise ValueError(f"{len(captions)} captions for {len(query_types)} query types")
        self.order = query_type_order(query_types)
        if batch_size < len(self.order):
            raise ValueError(f"batch_size {batch_size} is smaller than the {len(self.order)} query types present")
        self.batch_size = batch_size
        self.query_types, self.captions = list(query_types), list(captions)
        types = len(self.order)
        self.quotas = [batch_size // types + (1 if i < batch_size % types else 0) for i in range(types)]
        self._planned: tuple[int, list[list[int]]] | None = None  # (epoch, this rank's batches)
        self.batches_per_rank = len(self._rank_batches(0))

    @property
    def per_rank(self) -> int:
        return self.batches_per_rank * self.batch_size

    def plan(self, epoch: int) -> list[list[int]]:
        """Every rank's batches of ``epoch``, in dealing order (rank r trains ``plan[r::world_size]``)."""
        rng = random.Random(self.seed + epoch)
        pools: dict[str, dict[str, list[int]]] = {t: {} for t in self.order}  # type -> caption -> rows, as first seen
        for index, (kind, caption) in enumerate(zip(self.query_types, self.captions)):
            pools[kind].setdefault(caption, []).append(index)
        batches = []
        while (batch := self._next_batch(pools, rng)) is not None:
            batches.append(batch)
        batches = batches[: len(batches) // self.world_size * self.world_size]
        random.Random(self.seed + epoch + 7919).shuffle(batches)
        return batches

    def _next_batch(self, pools: dict[str, dict[str, list[int]]], rng: random.Random) -> list[int] | None:
        """One batch, or None once a type has fewer fresh captions than its quota."""
        used: set[str] = set()
        batch: list[int] = []
        type_order = list(range(len(self.order)))
        rng.shuffle(type_order)
        for t in type_order:
            rows_of = pools[self.order[t]]
            candidates = [caption for caption in rows_of if caption not in used]
            rng.shuffle(candidates)
            if len(candidates) < self.quotas[t]:
                return None
            for caption in candidates[: self.quotas[t]]:
                rows = rows_of[caption]
                pick = rng.randrange(len(rows))
                batch.append(rows[pick])
                if len(rows) > 1:
                    rows[pick] = rows[-1]  # remove it by moving the last row into its place
                    rows.pop()
                else:
                    del rows_of[caption]
                used.add(caption)
        return batch

    def _rank_batches(self, epoch: int) -> list[list[int]]:
        if self._planned is None or self._planned[0] != epoch:
            mine = self.plan(epoch)[self.rank :: self.world_size]
            if epoch and len(mine) > self.batches_per_rank:
                mine = mine[: self.batches_per_rank]
            self._planned = (epoch, mine)
        return self._planned[1]

    def __iter__(self):
        rows = [index for batch in self._rank_batches(self.epoch) for index in batch]
        return iter(rows[self.start_index :])

    def __len__(self) -> int:
        return sum(map(len, self._rank_batches(self.epoch))) - self.start_index
