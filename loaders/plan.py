"""Which samples a rank reads in an epoch, and in what order: a pure function of its arguments.

Train, with G = batch_size x world_size (the global batch) and W = world_size:
1. Shard order is a permutation drawn from (seed, epoch).
2. Those shards, concatenated, form the epoch's global sample sequence of N samples. It is
   cut into G equal contiguous partitions of M = N // G samples; the N mod G samples at the
   end are left out this epoch (a different set each epoch, as the shard order changes).
3. Each partition's order is a random rotation (reading is then two contiguous runs) followed
   by a shuffle buffer of `buffer` samples, both drawn from one generator seeded with
   (seed, epoch): row k of its draws belongs to partition k whatever W is. A rotation per
   partition, not one for the whole sequence, so that samples that share a shard position do
   not meet in the same global step every epoch.
4. Global step t holds output t of every partition k = 0..G-1, in slot k of the global batch.
   Rank r owns partitions [r P, (r+1) P) with P = G / W: a contiguous range of the global
   sequence (about N / W samples, read through the index), and exactly M batches of P samples
   on every rank whatever the shard sizes (no DDP hang on uneven shards). So global step t
   holds the same samples, in the same slots, for every W that divides G.
Computing the order up front lets a resumed run start at any step without replaying the data.

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
    breaks: np.ndarray  # int64, sorted: input indices where a contiguous read must start (partition starts, rotations)
    partitions: int = 1  # read streams consumed side by side: one sample of each per batch (train), 1 (eval)

    def locate(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(segment index, sample index inside the shard) of each input index."""
        starts = np.cumsum([0] + [stop - start for _, start, stop in self.segments])
        seg = np.searchsorted(starts, inputs, side="right") - 1
        first = np.array([start for _, start, _ in self.segments], np.int64)
        return seg, first[seg] + (inputs - starts[seg])


def shuffle_buffer_orders(draws: np.ndarray, buffer: int) -> np.ndarray:
    """Output orders [P, n] of P classic shuffle buffers (webdataset's `shuffle(buffer)`), one per row
    of `draws` (uniforms in [0, 1), float [P, n]), each over its inputs 0..n-1.

    Vectorized over the rows, a loop over the n outputs. Output t of a row always comes from an
    input index < t + buffer, which bounds how far the reader must run ahead of the consumer.
    """
    rows, n = draws.shape
    if buffer <= 1 or n <= 1:
        return np.tile(np.arange(n, dtype=np.int64), (rows, 1))
    size = min(buffer, n)  # the pool's fill, the same in every row
    pool = np.tile(np.arange(size, dtype=np.int64), (rows, 1))
    out = np.empty((rows, n), np.int64)
    every = np.arange(rows)
    for t in range(n):
        pick = (draws[:, t] * size).astype(np.int64)
        out[:, t] = pool[every, pick]
        if size + t < n:  # inputs left: the next one (index size + t) takes the emptied place
            pool[every, pick] = size + t
        else:  # drained: the last of the pool takes the emptied place
            size -= 1
            pool[every, pick] = pool[:, size]
    return out


def world_sizes_for(global_batch: int) -> list[int]:
    """The world sizes that can resume a run of global batch G: the divisors of G, ascending."""
    return [w for w in range(1, global_batch + 1) if global_batch % w == 0]


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
    """Batches per epoch on every rank: a pure function of the shard sizes (no plan, no shuffle).

    Train: M = N // G global steps, G = batch_size x world_size, whatever W makes up G.
    """
    total = sum(sizes)
    if total == 0:
        raise ValueError("the split has no samples")
    if train:
        global_batch = batch_size * world_size
        if total < global_batch:
            raise ValueError(
                f"{total} samples over {world_size} rank(s) give {total // world_size} per rank, "
                f"fewer than batch_size={batch_size}: no full batch to train on"
            )
        return total // global_batch
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
    """`buffer`: train, samples in each partition's shuffle buffer (the same for every W)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    total = sum(sizes)
    batches = epoch_length(sizes, train=train, world_size=world_size, batch_size=batch_size)
    if train:
        steps, own = batches, slice(rank * batch_size, (rank + 1) * batch_size)  # M; this rank's partitions
        shard_order = np.random.default_rng([seed, epoch, SHARD_STREAM]).permutation(len(sizes))
        segments = _segments(sizes, shard_order, own.start * steps, own.stop * steps)
        # Draws for all G partitions, row k for partition k, then this rank's rows: W never changes a row.
        rng = np.random.default_rng([seed, epoch, BUFFER_STREAM])
        rotation = rng.integers(0, steps, size=batch_size * world_size)[own]
        shuffled = shuffle_buffer_orders(rng.random((batch_size * world_size, steps))[own], buffer)
        first = np.arange(batch_size, dtype=np.int64)[:, None] * steps  # each partition's first input index
        inputs = first + (rotation[:, None] + shuffled) % steps  # [P, M]
        order = np.ascontiguousarray(inputs.T).reshape(-1)  # step t: output t of each partition, in slot order
        breaks = np.unique(np.concatenate([first[:, 0], first[:, 0] + rotation]))
        return EpochPlan(tuple(segments), order, np.ones(len(order), bool), batches, batch_size, breaks, batch_size)
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
    return EpochPlan(tuple(segments), order, real, batches, batch_size, np.zeros(0, np.int64))
