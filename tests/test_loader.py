"""The Loader end to end on real shards, real DALI in CPU mode (device_id=None), real torch."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stagewise.loaders import AugmentSpec, EngineSpec, Loader, ReadSpec, StageParams
from stagewise.loaders.feed import FLIP_STREAM, batch_rng
from stagewise.pipeline.build_shards import build_shards
from tests.conftest import PALETTE, build_tree_shards, write_solid_tree
from stagewise.benchmarks.datasets import write_photo_tree
from tests.test_loader_support import (
    pixel_means, sample_ids, take, unique_sample, write_samples, write_unique_tree,
)

PLAIN = StageParams(image_size=16, randaug_magnitude=0, mixup_alpha=0, randaug_ops=0)


@pytest.fixture(scope="module")
def solid(tmp_path_factory):
    return build_tree_shards(tmp_path_factory.mktemp("solid"),  # 24 samples in shards of 7, 7, 7, 3
                             lambda src: write_solid_tree(src, num_classes=4, per_class=6), samples_per_shard=7)


@pytest.fixture(scope="module")
def unique(tmp_path_factory):
    """23 samples over shards of 5, 5, 5, 5, 3, each image a colour unique to the sample."""
    root = tmp_path_factory.mktemp("unique")
    labels = write_unique_tree(root / "src", num_classes=1, per_class=23)
    build_shards(str(root / "src"), str(root / "ds"), samples_per_shard=5)
    return str(root / "ds"), labels


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return build_tree_shards(tmp_path_factory.mktemp("photos"),
                             lambda src: write_photo_tree(src, num_classes=3, per_class=8), samples_per_shard=10)


def write_half_red_tree(root: Path, count: int = 24) -> Path:
    """`root/class_0/h_i.jpg`: 40x40 images, left half red and right half blue, so a mirror shows.

    The green channel differs per image (i x 8) so that no two files are the same.
    """
    folder = root / "class_0"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = np.zeros((40, 40, 3), np.uint8)
        pixels[:, :20] = (230, 8 * i, 25)
        pixels[:, 20:] = (25, 8 * i, 230)
        Image.fromarray(pixels).save(folder / f"h_{i}.jpg", quality=95)
    return root


@pytest.fixture(scope="module")
def half_red(tmp_path_factory):
    """24 samples, each red on the left and blue on the right, in shards of 10, 10, 4."""
    return build_tree_shards(tmp_path_factory.mktemp("half-red"), write_half_red_tree, samples_per_shard=10)


def _palette_label(rgb: np.ndarray) -> int:
    return int(np.argmin([np.abs(rgb - np.array(c)).sum() for c in PALETTE[:4]]))


def test_labels_stay_attached_to_their_images_in_train_and_eval(solid):
    with Loader(solid, split="train", batch_size=5, stage=PLAIN, device="cpu", seed=3) as loader:
        batches = take(loader, epoch=0)
        assert len(batches) == len(loader) == 24 // 5
        for images, targets in batches:
            assert images.shape == (5, 3, 16, 16) and images.dtype == torch.float32
            assert targets.dtype == torch.int64
            assert [_palette_label(m) for m in pixel_means(images)] == targets.tolist()
    training_stage = StageParams(image_size=16, randaug_magnitude=15, mixup_alpha=0.2)  # eval ignores all but the size
    with Loader(solid, split="train", batch_size=5, stage=training_stage, device="cpu", train=False) as loader:
        batches = list(loader)
        images, targets = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        real = targets >= 0
        assert real.sum() == 24 and (targets[~real] == -1).all()  # 5 batches of 5: one padded slot
        assert [_palette_label(m) for m in pixel_means(images[real])] == targets[real].tolist()


def _mirrored(images: torch.Tensor) -> list[bool]:
    """Per output image: whether the red half, left in every source image, came out on the right."""
    red = images[:, 0] * 0.5 + 0.5  # [N, H, W] red channel on the 0..1 scale (undoing the 0.5/0.5 normalization)
    half = red.shape[-1] // 2
    left, right = red[:, :, :half].mean(dim=(1, 2)), red[:, :, half:].mean(dim=(1, 2))
    assert ((left - right).abs() > 0.5).all(), (left, right)  # every output shows a red half and a blue half
    return (right > left).tolist()


@pytest.mark.parametrize("hflip_prob", [0.0, 0.5, 1.0])
def test_hflip_prob_decides_the_mirroring_from_seed_epoch_and_batch(half_red, hflip_prob):
    # scale (1, 1): every crop window is the whole (square) image, so both halves reach the output.
    with Loader(half_red, split="train", batch_size=8, stage=PLAIN, device="cpu", seed=11,
                augment=AugmentSpec(scale=(1.0, 1.0), hflip_prob=hflip_prob)) as loader:
        mirrored = {(epoch, b): _mirrored(images)
                    for epoch in (0, 1) for b, (images, _) in enumerate(take(loader, epoch=epoch))}
    assert len(mirrored) == 2 * 3
    flags = [f for batch in mirrored.values() for f in batch]
    if hflip_prob == 0.0:
        assert not any(flags)  # off: never a mirrored image, over 48 samples
    elif hflip_prob == 1.0:
        assert all(flags)
    else:
        assert 0 < sum(flags) < len(flags)
        # The default draws the same flags as before the option existed, from (seed, epoch, batch) alone.
        for (epoch, b), got in mirrored.items():
            assert got == (batch_rng(11, epoch, b, FLIP_STREAM).random(8) < 0.5).tolist()


def test_set_stage_takes_effect_at_the_next_batch_on_the_same_pipeline(photos):
    small = StageParams(image_size=24, randaug_magnitude=0, mixup_alpha=0)  # magnitude 0: RandAugment off
    large_plain = StageParams(image_size=40, randaug_magnitude=0, mixup_alpha=0)
    large_strong = StageParams(image_size=40, randaug_magnitude=15, mixup_alpha=0)
    runs = {}
    for name, later in (("steady", small), ("plain", large_plain), ("strong", large_strong)):
        with Loader(photos, split="train", batch_size=4, stage=small, device="cpu", seed=1,
                    engine=EngineSpec(pipelines=2)) as loader:
            pipes = [id(p) for p in loader._runner.pipes]
            loader.set_epoch(0)
            stream = iter(loader)
            batches = [next(stream) for _ in range(2)]
            loader.set_stage(later)  # two batches are in flight by now: they must be redone
            batches += [next(stream) for _ in range(2)]
            assert [id(p) for p in loader._runner.pipes] == pipes  # no rebuild
            runs[name] = batches
    for name in ("plain", "strong"):
        for b in (0, 1):
            assert torch.equal(runs[name][b][0], runs["steady"][b][0])
        assert runs[name][2][0].shape == (4, 3, 40, 40) and runs["steady"][2][0].shape == (4, 3, 24, 24)
    # Same crops and flips at batch 2 (draws depend on (seed, epoch, batch) only); RandAugment is the difference.
    change = (runs["strong"][2][0] - runs["plain"][2][0]).abs().mean(dim=(1, 2, 3))
    assert (change > 0.05).sum() >= 3, change


def test_mixup_cutmix_and_smoothing_give_soft_targets_summing_to_one(solid):
    stages = [
        StageParams(image_size=16, randaug_magnitude=0, mixup_alpha=0.8, randaug_ops=0),
        StageParams(image_size=16, randaug_magnitude=0, mixup_alpha=0, randaug_ops=0, cutmix_alpha=1.0),
        StageParams(image_size=16, randaug_magnitude=0, mixup_alpha=0, randaug_ops=0, label_smoothing=0.1),
    ]
    with Loader(solid, split="train", batch_size=8, stage=stages[0], device="cpu") as loader:
        for stage in stages:
            loader.set_stage(stage)
            images, targets = take(loader, epoch=0, count=1)[0]
            assert targets.shape == (8, 4) and targets.dtype == torch.float32
            torch.testing.assert_close(targets.sum(dim=1), torch.ones(8))
            assert torch.isfinite(images).all()
            if stage.label_smoothing:
                assert targets.min() == pytest.approx(0.1 / 4) and targets.max() == pytest.approx(0.9 + 0.1 / 4)
            else:
                assert ((targets > 0.01) & (targets < 0.99)).any()  # mixed rows
                # Each image is the same blend of two solid colours as its target row says.
                expected = targets @ torch.tensor(PALETTE[:4], dtype=torch.float32)
                torch.testing.assert_close(torch.from_numpy(pixel_means(images)), expected, atol=6.0, rtol=0)


def test_rank_splits_are_disjoint_and_equal_and_eval_sees_each_sample_once(unique):
    url, labels = unique
    seen = {}
    for rank in (0, 1):
        with Loader(url, split="train", batch_size=3, stage=PLAIN, device="cpu", rank=rank, world_size=2,
                    seed=5) as loader:
            batches = take(loader, epoch=2)
            assert len(batches) == len(loader) == (23 // 2) // 3  # 11 per rank -> 3 full batches each
            seen[rank] = [i for images, _ in batches for i in sample_ids(images)]
            assert [labels[i] for i in seen[rank]] == [t for _, ts in batches for t in ts.tolist()]
    assert len(seen[0]) == len(seen[1]) == 9
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0])) == 9
    counted = []
    for rank in (0, 1, 2):  # 23 samples over 3 ranks: 7, 8, 8 -> every rank pads to 3 batches of 3
        with Loader(url, split="train", batch_size=3, stage=PLAIN, device="cpu", train=False, rank=rank,
                    world_size=3) as loader:
            batches = list(loader)
            assert len(batches) == len(loader) == 3
            for images, targets in batches:
                counted += [i for i, t in zip(sample_ids(images), targets.tolist()) if t >= 0]
    assert sorted(counted) == list(range(23))


def test_resume_from_a_saved_position_gives_bit_identical_batches(photos):
    stage = StageParams(image_size=32, randaug_magnitude=12, mixup_alpha=0.4, cutmix_alpha=1.0)
    later = StageParams(image_size=24, randaug_magnitude=20, mixup_alpha=0.2, label_smoothing=0.1)

    def run(state=None):
        loader = Loader(photos, split="train", batch_size=4, stage=stage, device="cpu", seed=7)
        if state is not None:
            loader.load_state_dict(state)
        loader.set_epoch(1)
        batches, saved = [], None
        start = loader.state_dict()["step"]
        for b, batch in enumerate(loader, start=start):
            batches.append(batch)
            if b == 1:
                saved = loader.state_dict()  # after batch 1: the next batch is 2
            if b == 2:
                loader.set_stage(later)  # the trainer's schedule, applied in both runs
        loader.close()
        return batches, saved

    full, saved = run()
    assert saved["epoch"] == 1 and saved["step"] == 2
    resumed, _ = run(saved)
    assert len(resumed) == len(full) - 2 == 4
    for (xa, ya), (xb, yb) in zip(full[2:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert full[3][0].shape[-1] == 24


def test_multi_label_targets_are_multi_hot_rows_summing_to_one(tmp_path):
    labels = {0: (1, 3), 1: (2,), 2: (0, 1, 2, 3), 3: (3, 0), 4: (2,), 5: (1, 2)}
    samples = [unique_sample(i, label=ls[0], labels=ls) for i, ls in labels.items()]
    write_samples(tmp_path, "train", [samples[:4], samples[4:]], classes=("a", "b", "c", "d"), multi_label=True)
    with Loader(str(tmp_path), split="train", batch_size=3, stage=PLAIN, device="cpu") as loader:
        batches = take(loader, epoch=0)
    assert len(batches) == 2
    for images, targets in batches:
        assert targets.dtype == torch.float32 and targets.shape == (3, 4)
        for i, row in zip(sample_ids(images), targets):
            expected = torch.zeros(4)
            expected[list(labels[i])] = 1.0 / len(labels[i])
            torch.testing.assert_close(row, expected)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def test_host_rss_stays_flat_across_four_stage_changes(photos):
    sizes = [48, 96, 64, 96, 48]  # 4 changes; the largest size comes first at change 1
    rss = []
    with Loader(photos, split="train", batch_size=8, stage=StageParams(48, 5, 0), device="cpu") as loader:
        epoch = 0
        for k, size in enumerate(sizes):
            loader.set_stage(StageParams(image_size=size, randaug_magnitude=5 + 5 * k, mixup_alpha=0.1 * k))
            for _ in range(2):  # 2 epochs of 3 batches per stage
                assert len(take(loader, epoch=epoch)) == 3
                epoch += 1
            rss.append(_rss_mb())
    print("host RSS after each stage (MB):", [round(r, 1) for r in rss])
    assert max(rss[2:]) - rss[1] < 25, rss  # after the largest stage, later stages add nothing


def test_channels_last_output_has_the_same_values(solid):
    kw = dict(split="train", batch_size=4, stage=StageParams(16, 10, 0.3), device="cpu", seed=9)
    with Loader(solid, **kw) as a, Loader(solid, augment=AugmentSpec(channels_last=True), **kw) as b:
        (xa, ya), (xb, yb) = take(a, epoch=0, count=1)[0], take(b, epoch=0, count=1)[0]
    assert xb.is_contiguous(memory_format=torch.channels_last) and not xa.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_bad_arguments_and_states_are_named(solid):
    with pytest.raises(ValueError, match="on_error='ignore'"):
        Loader(solid, split="train", batch_size=4, stage=PLAIN, device="cpu", reading=ReadSpec(on_error="ignore"))
    with pytest.raises(ValueError, match="device='tpu'"):
        Loader(solid, split="train", batch_size=4, stage=PLAIN, device="tpu")
    with pytest.raises(KeyError, match="'val'"):
        Loader(solid, split="val", batch_size=4, stage=PLAIN, device="cpu")
    for bad in (1.5, -0.1, True):
        with pytest.raises(ValueError, match=rf"AugmentSpec.hflip_prob={bad!r}"):
            Loader(solid, split="train", batch_size=4, stage=PLAIN, device="cpu", augment=AugmentSpec(hflip_prob=bad))
    with pytest.raises(ValueError, match=r"AugmentSpec.crop_pct=0"):
        AugmentSpec(crop_pct=0)
    with pytest.raises(ValueError, match=r"EngineSpec.stream_policy='fast'"):
        EngineSpec(stream_policy="fast")
    with pytest.raises(ValueError, match=r"ReadSpec.max_pixels=0"):
        ReadSpec(max_pixels=0)
    with pytest.raises(TypeError, match=r"augment=\{'scale'"):
        Loader(solid, split="train", batch_size=4, stage=PLAIN, device="cpu", augment={"scale": (0.5, 1)})
    with pytest.raises(ValueError, match="randaug_magnitude=-1"):
        StageParams(image_size=16, randaug_magnitude=-1, mixup_alpha=0)
    with Loader(solid, split="train", batch_size=4, stage=PLAIN, device="cpu") as loader:
        with pytest.raises(ValueError, match="world_size=2"):
            loader.load_state_dict({"epoch": 0, "batch": 1, "seed": 0, "world_size": 2, "batch_size": 4})
        with pytest.raises(ValueError, match="randaug_layers"):
            loader.set_stage(StageParams(image_size=16, randaug_magnitude=9, mixup_alpha=0))  # built with 0 layers


@pytest.mark.parametrize("batch_size", [4, 8])  # 8: 3 batches, so one pipeline gets fewer than 2 (a padded prefetch)
def test_prefetch_depth_and_pipeline_count_do_not_change_the_batches(photos, batch_size):
    stage = StageParams(image_size=24, randaug_magnitude=9, mixup_alpha=0.3)
    later = StageParams(image_size=32, randaug_magnitude=14, mixup_alpha=0, cutmix_alpha=1.0)
    runs = []
    for pipelines, prefetch in ((1, 1), (2, 2), (3, 1)):
        with Loader(photos, split="train", batch_size=batch_size, stage=stage, device="cpu", seed=4,
                    engine=EngineSpec(pipelines=pipelines, prefetch=prefetch)) as loader:
            batches = []
            for epoch in (0, 1):
                loader.set_stage(stage)
                loader.set_epoch(epoch)
                for b, batch in enumerate(loader):
                    batches.append(batch)
                    if b == 0:
                        loader.set_stage(later)
            runs.append(batches)
    for other in runs[1:]:
        assert len(other) == len(runs[0])
        for (xa, ya), (xb, yb) in zip(runs[0], other):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_the_next_epoch_opened_early_gives_the_same_batches_as_a_fresh_start(photos):
    stage = StageParams(image_size=24, randaug_magnitude=9, mixup_alpha=0.3)
    kw = dict(split="train", batch_size=4, stage=stage, device="cpu", seed=6)
    with Loader(photos, **kw) as fresh:
        expected = take(fresh, epoch=1)
    with Loader(photos, **kw) as loader:
        take(loader, epoch=0)
        assert loader._epochs.ahead and loader._epochs.ahead[0].number == 1  # opened while epoch 0 ran
        got = take(loader, epoch=1)
        take(loader, epoch=2, count=2)  # stopped early: the next set_epoch must not reuse epoch 3's batches
        again = take(loader, epoch=1)
    for batches in (got, again):
        assert len(batches) == len(expected)
        for (xa, ya), (xb, yb) in zip(expected, batches):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_one_batch_epochs_are_kept_in_flight_several_at_once_with_the_same_batches(photos):
    """24 samples, batch 16: one batch an epoch. 2 pipelines x 2 batches in flight hold several epochs ahead
    of the current one (a small split turns epochs over every batch), and every epoch is its fresh start's."""
    stage = StageParams(image_size=24, randaug_magnitude=9, mixup_alpha=0.3)
    kw = dict(split="train", batch_size=16, stage=stage, device="cpu", seed=2, engine=EngineSpec(pipelines=2, prefetch=2))
    with Loader(photos, **kw) as fresh:
        expected = [take(fresh, epoch=e) for e in reversed(range(5))][::-1]  # descending: never an epoch opened early
    with Loader(photos, **kw) as loader:
        got, ahead = [], []
        for _ in range(5):
            got.append(list(loader))
            ahead.append([e.number for e in loader._epochs.ahead])
        assert loader._runner.stats.epochs == 5 + len(ahead[-1])  # each epoch opened once
    assert all(len(numbers) >= 2 for numbers in ahead), ahead  # more than the one epoch ahead a boundary needs
    assert all(numbers == list(range(e + 1, e + 1 + len(numbers))) for e, numbers in enumerate(ahead)), ahead
    for want, have in zip(expected, got, strict=True):
        assert len(want) == len(have) == 1
        assert torch.equal(want[0][0], have[0][0]) and torch.equal(want[0][1], have[0][1])


def test_iterating_without_set_epoch_yields_epoch_0_then_epoch_1(photos):
    stage = StageParams(image_size=24, randaug_magnitude=9, mixup_alpha=0.3)
    kw = dict(split="train", batch_size=4, stage=stage, device="cpu", seed=8)
    with Loader(photos, **kw) as explicit:
        expected = [take(explicit, epoch=0), take(explicit, epoch=1)]
    with Loader(photos, **kw) as loader:
        assert loader.epoch == 0
        got = [list(loader)]  # like a DataLoader: no set_epoch
        assert loader.epoch == 1
        got.append([batch for batch in loader])
        assert loader.epoch == 2 and loader.state_dict()["epoch"] == 1
    for want, have in zip(expected, got, strict=True):
        assert len(want) == len(have) == len(loader)
        for (xa, ya), (xb, yb) in zip(want, have):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(got[0][0][0], got[1][0][0])  # epoch 1 is not epoch 0 again


def test_a_pass_broken_off_continues_and_an_old_iterator_stops(photos):
    kw = dict(split="train", batch_size=4, stage=PLAIN, device="cpu", seed=8)
    with Loader(photos, **kw) as explicit:
        expected = take(explicit, epoch=0)
    with Loader(photos, **kw) as loader:
        first = iter(loader)
        head = [next(first), next(first)]
        rest = list(loader)  # the same epoch, from batch 2
        assert len(head) + len(rest) == len(expected) and loader.epoch == 1
        with pytest.raises(RuntimeError, match="replaced by a newer iter"):
            next(first)
    for (xa, _), (xb, _) in zip(expected, head + rest, strict=True):
        assert torch.equal(xa, xb)
