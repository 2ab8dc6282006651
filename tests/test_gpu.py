"""GPU paths: the loader on the GPU (nvJPEG decode, GPU ops) and training with bf16, channels_last and compile.

CI has no GPU, so these skip there; run them on a CUDA machine with
`python -m pytest tests/test_gpu.py` (benchmarks/gpu_check.sh runs them first). Each
compares the GPU path with something that can fail: the CPU path on the same images,
an uninterrupted run, copies taken synchronously, the conditional-tree graph, or the
memory in use before the stage changes.
"""
from __future__ import annotations

import pytest
import torch

from stagewise.loaders import AugmentSpec, EngineSpec, Loader, LoaderError, ReadSpec, StageParams
from stagewise.loaders.graph import count_ops
from stagewise.pipeline.build_shards import build_shards
from stagewise.benchmarks.datasets import write_photo_tree
from tests.test_train_loop import TINY, records
from stagewise.train import config
from stagewise.train.loop import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MB = 2**20


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("gpu")
    write_photo_tree(root / "src", num_classes=4, per_class=32)
    dest = str(root / "shards")
    build_shards(str(root / "src"), dest, layout="folder", split="train", samples_per_shard=32)
    return dest


def stage(size: int, magnitude: float = 10.0, mixup: float = 0.0) -> StageParams:
    return StageParams(image_size=size, randaug_magnitude=magnitude, mixup_alpha=mixup)


def first_batch(loader: Loader) -> tuple[torch.Tensor, torch.Tensor]:
    loader.set_epoch(0)
    return next(iter(loader))


def test_gpu_batches_follow_the_stage_without_a_rebuild(photos):
    with Loader(photos, split="train", batch_size=16, stage=stage(128), device="cuda", seed=1) as loader:
        loader.set_epoch(0)
        batches = iter(loader)
        images, labels = next(batches)
        assert images.device.type == "cuda" and images.shape == (16, 3, 128, 128) and labels.device.type == "cuda"
        assert torch.isfinite(images).all() and images.std() > 0.1
        loader.set_stage(stage(192, mixup=0.8))
        images, targets = next(batches)
        assert images.shape == (16, 3, 192, 192)
        assert targets.shape == (16, 4) and torch.allclose(targets.sum(1), torch.ones(16, device="cuda"))
        assert (targets.max(1).values < 1).any()  # some pairs really were mixed


def test_gpu_eval_matches_the_cpu_path(photos):
    """No random ops in eval: nvJPEG + GPU resize must give what libjpeg + CPU resize give, up to rounding.

    torchvision's eval geometry on both: the same fractional region, with the filter's neighbours decoded
    (the GPU decodes whole images, nvImageCodec#55), so only the decoders' IDCT rounding differs."""
    out = {}
    # the CPU side twice: the host decoder (the CPU default where built) and DALI's own CPU decoder
    for name, device, engine in (("cuda", "cuda", EngineSpec()), ("cpu", "cpu", EngineSpec()),
                                 ("cpu-dali", "cpu", EngineSpec(host_decode=False))):
        with Loader(photos, split="train", batch_size=16, stage=stage(160), device=device, train=False,
                    augment=AugmentSpec(crop_pct=0.875, eval_geometry="torchvision"), engine=engine) as loader:
            out[name], labels = first_batch(loader)
            out[name + "-labels"] = labels.cpu()
    for cpu in ("cpu", "cpu-dali"):
        assert torch.equal(out[cpu + "-labels"], out["cuda-labels"])
        diff = (out["cuda"].cpu() - out[cpu]).abs()
        p99 = float(torch.quantile(diff.flatten().float(), 0.99))
        print(f"|gpu - {cpu}|: mean {diff.mean():.4f}, p99 {p99:.4f}, max {diff.max():.4f}")
        # normalized units (std 0.5): 0.02 is ~1.3 grey levels on 0..255; decoders differ by an IDCT rounding.
        # The mean was measured under 0.02 on an H100 (docs/benchmarks.md); the 99th percentile is not measured
        # yet (no GPU lent on 2026-12-02): 0.05 (~3 grey levels) bounds the tail until the print above gives it
        assert diff.mean() < 0.02, f"mean |gpu - {cpu}| = {diff.mean():.4f}"
        assert p99 < 0.05, f"p99 |gpu - {cpu}| = {p99:.4f}"


def test_gpu_resume_is_exact(photos):
    def run(resume_after: int | None) -> torch.Tensor:
        with Loader(photos, split="train", batch_size=8, stage=stage(128, mixup=0.2), device="cuda", seed=3) as a:
            a.set_epoch(0)
            it = iter(a)
            for _ in range(resume_after or 0):
                next(it)
            if resume_after is None:
                return [next(it) for _ in range(4)][-1][0].cpu()
            state = a.state_dict()
        with Loader(photos, split="train", batch_size=8, stage=stage(128, mixup=0.2), device="cuda", seed=3) as b:
            b.load_state_dict(state)
            it = iter(b)
            return [next(it) for _ in range(4 - resume_after)][-1][0].cpu()

    assert torch.equal(run(None), run(3))


def test_gpu_memory_is_flat_across_stage_changes(photos):
    sizes = [300, 128, 300, 128, 300]
    used = []
    with Loader(photos, split="train", batch_size=32, stage=stage(sizes[0], mixup=0.2), device="cuda") as loader:
        epoch = 0
        loader.set_epoch(epoch)
        it = iter(loader)
        for size in sizes:
            loader.set_stage(stage(size, mixup=0.2))
            for _ in range(6):
                try:
                    next(it)
                except StopIteration:
                    epoch += 1
                    loader.set_epoch(epoch)
                    it = iter(loader)
                    next(it)
            torch.cuda.synchronize()
            free, total = torch.cuda.mem_get_info()
            used.append((total - free) / MB)
    print("GPU memory in use after each stage (MiB):", [round(u) for u in used])
    # the second and third visits to 300 px reuse the first visit's buffers
    assert max(used[2], used[4]) <= used[0] + 64, used


@pytest.mark.parametrize("compile_model", [False, True])
def test_gpu_training_bf16_channels_last(photos, tmp_path, compile_model):
    run_dir = tmp_path / "run"
    args = [a for a in TINY if not a.startswith(("--run.device", "--model.channels_last", "--run.threads"))]
    cfg = config.parse(args + ["--data", photos, "--run-dir", str(run_dir), "--run.device=cuda", "--run.bf16=true",
                               "--model.channels_last=true", f"--model.compile={str(compile_model).lower()}",
                               "--schedule.epochs=2", "--schedule.stages=2", "--schedule.min_size=64",
                               "--schedule.max_size=96", "--data.val_split=", "--run.eval=none"])
    result = train(cfg, print_config=False)
    steps = records(run_dir, "train")
    assert len(steps) == result["steps"] > 0
    assert [tuple(r["input_shape"])[2:] for r in steps] == [(64, 64)] * (len(steps) // 2) + [(96, 96)] * (len(steps) // 2)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)


def test_dlpack_handover_is_safe_on_a_delayed_consumer_stream(photos):
    """Batches handed over on a consumer stream that is held back must equal synchronous copies.

    The reference run copies each batch and synchronizes. The test run pulls every batch on a side
    stream that first spins the GPU (torch.cuda._sleep), reads the batch only after that, and drops
    the loader's tensor at once: if DALI reused an output buffer before the delayed read (nothing
    kept it alive), or torch read it before DALI finished it, the reads would differ."""
    kw = dict(split="train", batch_size=16, stage=stage(128, mixup=0.2), device="cuda", seed=5)
    with Loader(photos, **kw) as ref:
        expected = []
        for images, _ in ref:
            expected.append(images.clone())
            torch.cuda.synchronize()
    consumer = torch.cuda.Stream()
    got = []
    with Loader(photos, **kw) as loader, torch.cuda.stream(consumer):
        for images, _ in loader:
            torch.cuda._sleep(20_000_000)  # ~10 ms of GPU time on the consumer stream before the read
            got.append(images * 1.0)
            del images
        assert len(loader._runner.keep) <= loader._runner.keep.limit  # bounded
    consumer.synchronize()
    assert len(got) == len(expected) > 2
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


def test_gpu_branchless_randaugment_matches_the_tree_and_has_at_most_100_operators(photos):
    """The GPU graph (every kernel on the whole batch, then a pick) against the branching one, same formulas.

    Bit-identical in CPU mode (tests/test_loader_graph.py). On the GPU the compiler may contract a
    multiply-add differently in the two graphs' kernels, a last-bit difference that a later Posterize or
    Solarize threshold can turn into a bin for a rare pixel: stated tolerance, at most 1 pixel value in
    10,000 off by more than 1e-3 (normalized units) and a mean |diff| under 1e-4."""
    out = {}
    for branchless in (False, True):
        with Loader(photos, split="train", batch_size=32, stage=stage(96, magnitude=15, mixup=0.3), device="cuda",
                    seed=9, engine=EngineSpec(branchless=branchless)) as loader:
            out[branchless] = torch.cat([x.float().cpu() for x, _ in loader])
            if branchless:
                total = sum(count_ops(loader._runner.pipes[0]).values())
                print("built GPU graph operators:", total)
                assert total <= 100
    diff = (out[True] - out[False]).abs()
    print(f"branchless vs tree on GPU: mean {diff.mean():.2e}, max {diff.max():.3f}, "
          f"share > 1e-3: {(diff > 1e-3).float().mean():.2e}")
    assert diff.mean() < 1e-4 and (diff > 1e-3).float().mean() <= 1e-4


def test_gpu_a_corrupt_scan_is_skipped_and_named_under_raise(tmp_path):
    from tests.test_loader_faults import _good, _truncated_scan
    from tests.test_loader_support import write_raw_split

    write_raw_split(tmp_path, "train", [_good(7) + [{"__key__": b"corrupt", "jpg": _truncated_scan(3), "cls": b"0"}]],
                    classes=("only",))
    plain = StageParams(image_size=32, randaug_magnitude=0, mixup_alpha=0, randaug_ops=0)
    with Loader(str(tmp_path), split="train", batch_size=4, stage=plain, device="cuda",
                reading=ReadSpec(on_error="skip")) as loader, pytest.warns(RuntimeWarning):
        assert len(list(loader)) == 2 and loader.skipped == 1
    with Loader(str(tmp_path), split="train", batch_size=4, stage=plain, device="cuda") as loader, \
            pytest.raises(LoaderError, match=r"train-000000\.tar: sample 'corrupt': "):
        list(loader)
