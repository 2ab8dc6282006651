"""The loader's reuse example (resnet152) and the bench-loader command run end to end on CPU."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import build_tree_shards
from stagewise.benchmarks.datasets import write_photo_tree
from stagewise.loaders import hostdecode

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return build_tree_shards(tmp_path_factory.mktemp("example"),
                             lambda src: write_photo_tree(src, num_classes=3, per_class=4), samples_per_shard=3)


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    # One OpenMP thread: torch's spinning OpenMP workers next to DALI's threads can slow a step
    # on 2 busy cores by 10x; the test checks that the loader feeds a real model, not its speed.
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_resnet152_example_trains_a_few_steps_from_shards(photos):
    done = _run([sys.executable, "examples/resnet152.py", photos, "--steps", "2", "--batch-size", "2",
                 "--size", "64", "--device", "cpu"], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = re.findall(r"step (\d) epoch \d images \(2, 3, 64, 64\) loss ([0-9.]+)", done.stdout)
    assert [s for s, _ in losses] == ["0", "1"] and all(float(v) > 0 for _, v in losses), done.stdout


def test_bench_loader_prints_the_ratio_and_the_per_batch_columns_as_json(photos):
    done = _run([sys.executable, "-m", "stagewise.pipeline", "bench-loader", photos, "--sizes", "32,48", "--batches", "2",
                 "--batch-size", "4", "--rounds", "1", "--warmup", "1", "--threads", "1", "--mixup-alpha", "0.2",
                 "--json"], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["size"] for r in rows] == [32, 48]
    for r in rows:
        assert r["ours_img_s"] > 0 and r["baseline_img_s"] > 0
        assert r["ratio"] == pytest.approx(r["ours_img_s"] / r["baseline_img_s"], rel=0.01)  # one round: no median
        parts = [r[f"{k}_ms"] for k in ("assemble", "draw", "feed", "handover")]
        assert all(p > 0 for p in parts) and r["consumer_ms"] >= sum(parts) - 0.01
        assert r["consumer_ms"] == pytest.approx(sum(parts) + r["other_ms"], abs=0.01)
        assert 0 < r["ready_ms"] and 0 < r["ready_handover_ms"] < r["ready_ms"]
        assert r["ceiling_img_s"] == pytest.approx(4 / r["ready_ms"] * 1e3, rel=0.01)
        assert r["wait_ms"] >= 0 and r["dali_cpu_ms"] > 0
        assert (r["host_cpu_ms"] > 0) == hostdecode.AVAILABLE  # the host decoder is the CPU default where built
        assert r["ops"] > r["gpu_graph_ops"] > 0 and r["gpu_graph_ops"] <= 100
        assert r["mixup"] == 0.2 and r["batch"] == 4 and len(r["load_average"]) == 2


def test_bench_loader_baseline_feeds_more_workers_than_shards(tmp_path, monkeypatch):
    """16 workers on 2 shards hung the baseline on the GPU machine: workers without a shard yielded nothing."""
    from types import SimpleNamespace

    import torch

    from stagewise.benchmarks.bench_loader import _BaselineShards
    from stagewise.shards import iter_samples, open_split

    one_shard = build_tree_shards(tmp_path, lambda src: write_photo_tree(src, num_classes=3, per_class=2),
                                  samples_per_shard=6)
    urls = open_split(one_shard, "train").shard_urls
    assert len(urls) == 1
    labels = {}
    for worker in range(3):
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda w=worker: SimpleNamespace(id=w, num_workers=3))
        samples = list(_BaselineShards(urls, size=32, magnitude=5.0, per_worker=4))
        assert len(samples) == 4 and all(x.shape == (3, 32, 32) for x, _ in samples)
        labels[worker] = [y for _, y in samples]
    order = [s.label for s in iter_samples(urls[0])]
    for worker in range(3):  # every 3rd sample from its own offset, cycling over the shard
        assert labels[worker] == [order[worker], order[worker + 3]] * 2
