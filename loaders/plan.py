"""Which samples a rank reads in an epoch, and in what order: a pure function of its arguments.

Train:
1. Shard order is a permutation drawn from (seed, epoch).
2. Those shards, concatenated, form the epoch's global sample sequence; rank r takes
   the contiguous range [r M, (r+1) M) with M = N // world_size. Every rank gets
   exactly M samples whatever the shard sizes, so every rank yields the same number
   of batches (no DDP hang on uneven shards); the N mod world_size samples at the
   end are left out this epoch (a different set each epoch).
3. A shuffle buffer of `buffer` samples, simulated on indices with a generator from
   (seed, epoch, rank), reorders the rank's stream. Computing the order up front
   lets a resumed run start at any batch without replaying the data.
4. Batches = M // batch_size; the remainder is dropped.

Eval: manifest order, rank r takes [floor(r N / W), floor((r+1) N / W)), every rank
is padded to ceil(ceil(N / W) / batch_size) batches; padded positions are marked so
the loader emits label -1 for them. Every sample is seen exactly once across ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SHARD_STREAM, BUFFER_STREAM = 11, 12  # generator stream ids, kept distinct from the batch streams


@dataclass(frozen=True)
class EpochPlan:
    segments: tuple[tuple[int, int, int], ...]  # (shard index, first sample, stop sample), in read order
    order: np.ndarray  # int64 [num_batches * batch_size]: input index (into the segments' concatenation) per output position
    real: np.ndarray  # bool, same length: False marks eval padding
    num_batches: int
    batch_size: int

    def locate(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(segment index, sample index inside the shard) of each input index."""
        starts = np.cumsum([0] + [stop - start for _, start, stop in self.segments])
        seg = np.searchsorted(starts, inputs, side="right") - 1
        first = np.array([start for _, start, _ in self.segments], np.int64)
        return seg, first[seg] + (inputs - starts[seg])


def shuffle_buffer_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """Output order of a classic shuffle buffer over inputs 0..n-1 (webdataset's `shuffle(buffer)`).

    Output position p always comes from an input index < p + buffer, which bounds
    how far the reader must run ahead of the consumer.
    """
    if buffer <= 1 or n <= 1:
        return np.arange(n, dtype=np.int64)
    draws = rng.random(n)
    pool = list(range(min(buffer, n)))
    nxt = len(pool)
    out = np.empty(n, np.int64)
    for p in range(n):
        j = int(draws[p] * len(pool))
        out[p] = pool[j]
        if nxt < n:
            pool[j] = nxt
            nxt += 1
        else:
            pool[j] = pool[-1]
            pool.pop()
    return out


def _segments(sizes: list[int], shard_order: np.ndarray, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """Pieces of the concatenation of shards (in `shard_order`) covering global positions [lo, hi)."""
    out, pos = [], 0
    for shard in shard_order:
        size = sizes[int(shard)]
        a, b = max(lo, pos), min(hi, pos + size)
        if a < b:
            out.append((int(shard), a - pos, b - pos))
        pos += size
        if pos >= hi:
            break
    return out


def epoch_length(sizes: list[int], *, train: bool, world_size: int, batch_size: int) -> int:
    """Batches per epoch on every rank: a pure function of the shard sizes (no plan, no shuffle)."""
    total = sum(sizes)
    if total == 0:
        raise ValueError("the split has no samples")
    if train:
        per_rank = total // world_size
        batches = per_rank // batch_size
        if batches == 0:
            raise ValueError(
                f"{total} samples over {world_size} rank(s) give {per_rank} per rank, "
                f"fewer than batch_size={batch_size}: no full batch to train on"
            )
        return batches
    return math.ceil(math.ceil(total / world_size) / batch_size)


def plan_epoch(
    sizes: list[int],
    *,
    train: bool,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    batch_size: int,
    buffer: int,
) -> EpochPlan:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    total = sum(sizes)
    batches = epoch_length(sizes, train=train, world_size=world_size, batch_size=batch_size)
    if train:
        shard_order = np.random.default_rng([seed, epoch, SHARD_STREAM]).permutation(len(sizes))
        per_rank = total // world_size
        segments = _segments(sizes, shard_order, rank * per_rank, (rank + 1) * per_rank)
        rng = np.random.default_rng([seed, epoch, rank, BUFFER_STREAM])
        order = shuffle_buffer_order(per_rank, buffer, rng)[: batches * batch_size]
        return EpochPlan(tuple(segments), order, np.ones(len(order), bool), batches, batch_size)
    lo, hi = (rank * total) // world_size, ((rank + 1) * total) // world_size
    segments = _segments(sizes, np.arange(len(sizes)), lo, hi)
    count = hi - lo
    if count == 0:  # more ranks than samples: read sample 0 only as padding material
        segments = _segments(sizes, np.arange(len(sizes)), 0, 1)
    slots = batches * batch_size
    order = np.zeros(slots, np.int64)
    order[:count] = np.arange(count)
    real = np.zeros(slots, bool)
    real[:count] = True
    return EpochPlan(tuple(segments), order, real, batches, batch_size)
