"""The world-size-independent plan end to end: real shards, real decode (DALI CPU mode), G = 8 global batch.

Rank r of W is a `Loader(batch_size=8 // W, rank=r, world_size=W)` in this process; a global step is
the ranks' batches concatenated in rank order (slot order).
"""
from __future__ import annotations

import pytest
import torch

from stagewise.benchmarks.datasets import write_photo_tree
from stagewise.loaders import EngineSpec, Loader, StageParams
from tests.conftest import build_tree_shards

G = 8
STAGE = StageParams(image_size=24, randaug_magnitude=12, mixup_alpha=0, randaug_ops=2)  # RandAugment on, no mixing
SEED = 13


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """48 real photographs (4 classes) in shards of 7 (uneven: 7 x 6 + 6): 6 global steps of 8 per epoch."""
    return build_tree_shards(tmp_path_factory.mktemp("elastic"),
                             lambda src: write_photo_tree(src, num_classes=4, per_class=12), samples_per_shard=7)


def _loaders(url: str, world_size: int, engine: EngineSpec | None = None) -> list[Loader]:
    return [Loader(url, split="train", batch_size=G // world_size, stage=STAGE, device="cpu", seed=SEED, rank=r,
                   world_size=world_size, num_threads=1, engine=engine) for r in range(world_size)]


def _next(loader: Loader, stream):
    """(batch, stream): the loader's next batch, going on into the next epoch as a training loop does."""
    try:
        return next(stream), stream
    except StopIteration:
        stream = iter(loader)
        return next(stream), stream


def _steps(loaders: list[Loader], count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The next `count` global steps: every rank's batch, concatenated in rank order."""
    streams = [iter(loader) for loader in loaders]
    out = []
    for _ in range(count):
        batches = []
        for r, loader in enumerate(loaders):
            batch, streams[r] = _next(loader, streams[r])
            batches.append(batch)
        out.append((torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])))
    return out


def _close(loaders: list[Loader]) -> None:
    for loader in loaders:
        loader.close()


def _same(a, b) -> None:
    assert len(a) == len(b)
    for t, ((xa, ya), (xb, yb)) in enumerate(zip(a, b)):
        assert torch.equal(ya, yb), f"global step {t}: labels {ya.tolist()} != {yb.tolist()}"
        assert torch.equal(xa, xb), f"global step {t}: pixels differ"


@pytest.fixture(scope="module")
def uninterrupted(photos):
    """Epoch 0 (6 steps) and the first step of epoch 1 on one rank."""
    loaders = _loaders(photos, 1)
    try:
        assert len(loaders[0]) == 48 // G
        return _steps(loaders, 7)
    finally:
        _close(loaders)


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_every_global_step_holds_the_same_labels_and_pixels_on_any_world_size(photos, uninterrupted, world_size):
    loaders = _loaders(photos, world_size)
    try:
        assert {len(loader) for loader in loaders} == {6}
        got = _steps(loaders, 3)
    finally:
        _close(loaders)
    _same(got, uninterrupted[:3])  # slot by slot, so the multiset of (label, pixels) too
    assert len({y for _, ys in got for y in ys.tolist()}) > 1


def test_dalis_own_decoder_and_randaugment_graph_give_the_same_pixels_on_any_world_size(photos):
    """The same check with DALI decoding the crop windows (the host decoder is the CPU default)."""
    engine = EngineSpec(host_decode=False)
    runs = []
    for world_size in (1, 4):
        loaders = _loaders(photos, world_size, engine)
        try:
            runs.append(_steps(loaders, 2))
        finally:
            _close(loaders)
    _same(runs[1], runs[0])


def test_a_two_rank_state_resumes_on_one_rank_and_a_one_rank_state_on_two(photos, uninterrupted):
    two = _loaders(photos, 2)
    try:
        _same(_steps(two, 2), uninterrupted[:2])
        states = [loader.state_dict() for loader in two]
    finally:
        _close(two)
    assert states[0] == states[1]  # a global position: any rank's state will do
    assert {k: states[0][k] for k in ("format", "epoch", "step", "seed", "global_batch", "split")} == {
        "format": 2, "epoch": 0, "step": 2, "seed": SEED, "global_batch": G, "split": "train"}
    one = _loaders(photos, 1)
    try:
        one[0].load_state_dict(states[1])
        _same(_steps(one, 5), uninterrupted[2:])  # the rest of epoch 0, then epoch 1's first step
        one[0].load_state_dict({**states[0], "step": 3})
        state = one[0].state_dict()
    finally:
        _close(one)
    two = _loaders(photos, 2)
    try:
        for loader in two:
            loader.load_state_dict(state)
        _same(_steps(two, 4), uninterrupted[3:])
    finally:
        _close(two)


def test_a_state_of_another_global_batch_is_refused_in_one_line_naming_the_world_sizes_that_work(photos):
    saved = {"format": 2, "epoch": 0, "step": 1, "seed": SEED, "global_batch": 8, "split": "train",
             "stage": {}}
    with Loader(photos, split="train", batch_size=2, stage=STAGE, device="cpu", seed=SEED, rank=1, world_size=3,
                num_threads=1) as loader:
        with pytest.raises(ValueError) as caught:
            loader.load_state_dict(saved)
    message = str(caught.value)
    assert message == ("loader state has global batch 8; this loader's is 6 (3 ranks x 2): resume with a world "
                       "size dividing 8 (1, 2, 4, 8) and batch_size = 8 / world size")
    assert "\n" not in message


def test_a_first_format_state_resumes_on_its_own_world_size_only(photos, uninterrupted):
    old = {"epoch": 0, "batch": 2, "seed": SEED, "rank": 0, "world_size": 2, "batch_size": 4, "split": "train",
           "stage": {}}
    with Loader(photos, split="train", batch_size=8, stage=STAGE, device="cpu", seed=SEED, num_threads=1) as loader:
        with pytest.raises(ValueError, match="world_size=2 but this loader has 1"):
            loader.load_state_dict(old)
    two = _loaders(photos, 2)
    try:
        for loader in two:
            with pytest.warns(RuntimeWarning, match="resuming epoch 0 at batch 2"):
                loader.load_state_dict(old)
        _same(_steps(two, 4), uninterrupted[2:6])  # at its (epoch, batch), in the new plan's order
    finally:
        _close(two)
