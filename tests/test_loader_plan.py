"""The epoch planner: which samples each rank reads, in which order (pure, no data needed)."""
from __future__ import annotations

import numpy as np
import pytest

from stagewise.loaders.plan import EpochPlan, plan_epoch, shuffle_buffer_orders, world_sizes_for


def _samples(plan: EpochPlan, real_only: bool = True) -> list[tuple[int, int]]:
    """(shard, sample) of each output position."""
    seg, sample = plan.locate(plan.order)
    out = [(plan.segments[s][0], int(k)) for s, k in zip(seg, sample)]
    return [x for x, r in zip(out, plan.real) if r or not real_only]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_train_ranks_get_disjoint_equal_shares_of_uneven_shards(world_size):
    sizes = [13, 2, 7, 30, 1, 9]  # very uneven
    plans = [plan_epoch(sizes, train=True, seed=4, epoch=2, rank=r, world_size=world_size, batch_size=4, buffer=8)
             for r in range(world_size)]
    assert len({p.num_batches for p in plans}) == 1  # the same batch count on every rank: no DDP hang
    assert plans[0].num_batches == (sum(sizes) // world_size) // 4
    picked = [set(_samples(p)) for p in plans]
    for p, s in zip(plans, picked):
        assert len(s) == p.num_batches * 4  # no duplicates within a rank
        assert all(0 <= k < sizes[shard] for shard, k in s)
    for a in range(world_size):
        for b in range(a + 1, world_size):
            assert not picked[a] & picked[b]


def test_train_order_depends_on_seed_and_epoch_only():
    sizes = [10, 10, 10, 10]
    args = dict(train=True, rank=0, world_size=1, batch_size=5, buffer=16)
    a = plan_epoch(sizes, seed=1, epoch=0, **args)
    again = plan_epoch(sizes, seed=1, epoch=0, **args)
    other_epoch = plan_epoch(sizes, seed=1, epoch=1, **args)
    assert _samples(a) == _samples(again)
    assert _samples(a) != _samples(other_epoch)


def test_eval_sees_every_sample_exactly_once_across_ranks_with_marked_padding():
    sizes = [5, 5, 5, 5, 3]
    for world_size in (1, 2, 3, 5, 30):
        plans = [plan_epoch(sizes, train=False, seed=0, epoch=0, rank=r, world_size=world_size, batch_size=4,
                            buffer=0) for r in range(world_size)]
        assert len({p.num_batches for p in plans}) == 1
        real = [x for p in plans for x in _samples(p)]
        assert sorted(real) == sorted((s, k) for s, n in enumerate(sizes) for k in range(n))


def _one_buffer(n: int, buffer: int, draws: np.ndarray) -> list[int]:
    """The classic shuffle buffer, one output at a time (what `shuffle_buffer_orders` vectorizes)."""
    pool, nxt, out = list(range(min(buffer, n))), min(buffer, n), []
    for u in draws:
        j = int(u * len(pool))
        out.append(pool[j])
        if nxt < n:
            pool[j], nxt = nxt, nxt + 1
        else:
            pool[j] = pool[-1]
            pool.pop()
    return out


def test_shuffle_buffers_are_permutations_that_never_read_far_ahead():
    draws = np.random.default_rng(0).random((3, 500))
    orders = shuffle_buffer_orders(draws, 32)
    for row, order in zip(draws, orders):
        assert order.tolist() == _one_buffer(500, 32, row)  # each row is the one-at-a-time buffer on its draws
        assert sorted(order.tolist()) == list(range(500))
        assert (order < np.arange(500) + 32).all()  # output p comes from input < p + buffer
        assert (order != np.arange(500)).mean() > 0.9
    assert shuffle_buffer_orders(draws[:, :10], 0).tolist() == [list(range(10))] * 3
    assert shuffle_buffer_orders(draws[:, :10], 64)[1].tolist() == _one_buffer(10, 64, draws[1, :10])


def _global_steps(sizes, world_size, global_batch=8, **kw) -> tuple[list[list[tuple[int, int]]], list[EpochPlan]]:
    """Each global step's (shard, sample) per slot, gathered from every rank's plan; and the plans."""
    b = global_batch // world_size
    plans = [plan_epoch(sizes, train=True, rank=r, world_size=world_size, batch_size=b, **kw)
             for r in range(world_size)]
    per_rank = [_samples(p) for p in plans]
    steps = [[x for rank in per_rank for x in rank[t * b:(t + 1) * b]] for t in range(plans[0].num_batches)]
    return steps, plans


def _read_range(plan: EpochPlan, sizes, shard_order) -> tuple[int, int]:
    """[lo, hi) in the epoch's shard-ordered concatenation that a rank's segments cover."""
    start = np.cumsum([0] + [sizes[s] for s in shard_order])
    where = {int(s): int(start[k]) for k, s in enumerate(shard_order)}
    pieces = [(where[shard] + a, where[shard] + b) for shard, a, b in plan.segments]
    assert all(p[1] == q[0] for p, q in zip(pieces, pieces[1:]))  # contiguous
    return pieces[0][0], pieces[-1][1]


@pytest.mark.parametrize("epoch", [0, 3])
def test_global_steps_hold_the_same_samples_in_the_same_slots_on_any_world_size_dividing_g(epoch):
    sizes = [13, 2, 7, 30, 1, 9, 20, 5, 11]  # 98 samples: 12 global steps of 8, 2 left out
    kw = dict(seed=4, epoch=epoch, buffer=3)
    reference, _ = _global_steps(sizes, 1, **kw)
    assert len(reference) == 98 // 8
    seen = [x for step in reference for x in step]
    assert len(set(seen)) == len(seen) == 96  # no sample twice in the epoch
    shard_order = np.random.default_rng([4, epoch, 11]).permutation(len(sizes))  # plan.SHARD_STREAM
    for world_size in (2, 4, 8):
        steps, plans = _global_steps(sizes, world_size, **kw)
        assert steps == reference  # slot by slot, so also as sets
        assert {p.num_batches for p in plans} == {12}  # equal batches on every rank: no DDP hang
        ranges = [_read_range(p, sizes, shard_order) for p in plans]
        assert ranges == [(r * 96 // world_size, (r + 1) * 96 // world_size) for r in range(world_size)]
        # a rank reads its contiguous 1/W of the epoch's samples and nothing else
        for p, (lo, hi) in zip(plans, ranges):
            assert sum(b - a for _, a, b in p.segments) == hi - lo == 96 // world_size
    other, _ = _global_steps(sizes, 1, seed=4, epoch=epoch + 1, buffer=3)
    assert other != reference


def test_partitions_are_reshuffled_every_epoch_even_when_shards_are_all_one_partition_long():
    """16 shards of 4 samples, G = 16: M = 4, every partition is one shard. One rotation for the whole
    sequence would keep each shard's samples in the same steps every epoch; per-partition rotations
    and buffers do not."""
    sizes = [4] * 16
    together = []
    for epoch in range(4):
        steps, _ = _global_steps(sizes, 1, global_batch=16, seed=0, epoch=epoch, buffer=2)
        together.append({frozenset(step) for step in steps})
    assert len({frozenset(s) for s in together}) == 4  # each epoch groups the samples into steps anew


def test_world_sizes_for_a_global_batch_are_its_divisors():
    assert world_sizes_for(8) == [1, 2, 4, 8]
    assert world_sizes_for(12) == [1, 2, 3, 4, 6, 12]
    assert world_sizes_for(1) == [1]


def test_too_few_samples_for_a_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than batch_size=8"):
        plan_epoch([3, 4], train=True, seed=0, epoch=0, rank=0, world_size=2, batch_size=8, buffer=4)
