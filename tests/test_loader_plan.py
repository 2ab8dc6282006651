"""The epoch planner: which samples each rank reads, in which order (pure, no data needed)."""
from __future__ import annotations

import numpy as np
import pytest

from stagewise.loaders.plan import EpochPlan, plan_epoch, shuffle_buffer_order


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


def test_shuffle_buffer_is_a_permutation_that_never_reads_far_ahead():
    rng = np.random.default_rng(0)
    order = shuffle_buffer_order(500, 32, rng)
    assert sorted(order.tolist()) == list(range(500))
    assert (order < np.arange(500) + 32).all()  # output p comes from input < p + buffer
    assert (order != np.arange(500)).mean() > 0.9
    assert shuffle_buffer_order(10, 0, rng).tolist() == list(range(10))


def test_too_few_samples_for_a_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than batch_size=8"):
        plan_epoch([3, 4], train=True, seed=0, epoch=0, rank=0, world_size=2, batch_size=8, buffer=4)
