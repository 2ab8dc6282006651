"""`--executor ray`: the same bytes as the local executor, resume, errors that reach the driver.

One local Ray per module (`ray.init(num_cpus=2)`, about 4.5 s), with its
temporary folder inside pytest's and no auth token in the home folder.
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from stagewise.pipeline.build_shards import build_shards
from stagewise.pipeline.cli import main as cli
from tests.conftest import patched_env, write_solid_tree
from tests.test_imagenet21k import shard_bytes, write_21k_tree

ray = pytest.importorskip("ray")

HOME_RAY = Path.home() / ".ray"


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    if ray.is_initialized():
        pytest.skip("another Ray session is already running in this process")
    home_had_ray = HOME_RAY.exists()
    tmp = tmp_path_factory.mktemp("ray")
    with patched_env({"RAY_TMPDIR": str(tmp), "RAY_AUTH_MODE": "disabled"}):
        ray.init(num_cpus=2, include_dashboard=False)
        try:
            yield tmp
        finally:
            ray.shutdown()
    assert home_had_ray or not HOME_RAY.exists(), f"Ray wrote {HOME_RAY}"


@pytest.fixture(scope="module")
def tree21k(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("in21k") / "src"
    write_21k_tree(root)
    return root


def test_ray_builds_21k_byte_identical_to_local(ray_session, tree21k, tmp_path):
    kw = dict(layout="imagenet21k", holdout=4, seed=7, samples_per_shard=5)
    local = build_shards(str(tree21k), str(tmp_path / "local"), workers=1, **kw)
    on_ray = build_shards(str(tree21k), str(tmp_path / "ray"), executor="ray", **kw)
    ours = shard_bytes(tmp_path / "ray")
    assert ours == shard_bytes(tmp_path / "local")
    assert sum(n.endswith(".tar") for n in ours) >= 6 and "val-000000.tar" in ours
    assert [r.duplicates for r in on_ray] == [r.duplicates for r in local] == [4, 0]
    assert [(r.written, r.rejected, r.shards) for r in on_ray] == [(r.written, r.rejected, r.shards) for r in local]
    assert ray.is_initialized()  # the module's session was used, not replaced
    # the join and the shards really ran as Ray tasks (task events; Ray 2.60 keeps them without a dashboard)
    deadline = time.time() + 15  # task events reach the GCS about once a second
    while True:
        ran = Counter(e["name"].rsplit(".", 1)[-1] for e in ray.timeline() if e.get("cat", "").startswith("task::"))
        if (ran["_map_returns"] >= 2 and ran["_reduce_args"] >= 2 and ran["build_one"] >= 6) or time.time() > deadline:
            break
        time.sleep(0.5)
    assert ran["_map_returns"] >= 2 and ran["_reduce_args"] >= 2 and ran["build_one"] >= 6, ran
    assert any(p.name.startswith("session_") for p in ray_session.rglob("session_*"))  # RAY_TMPDIR honoured


def test_ray_resumes_and_matches_a_local_build(ray_session, tmp_path):
    src = write_solid_tree(tmp_path / "src", num_classes=3, per_class=8)
    local, dest = tmp_path / "local", tmp_path / "ray"
    build_shards(str(src), str(local), samples_per_shard=4, seed=2)
    [first] = build_shards(str(src), str(dest), samples_per_shard=4, seed=2, executor="ray")
    assert first.shards == 6 and first.resumed_shards == 0
    (dest / "train-000003.tar").unlink()  # a shard lost with a preempted node
    (dest / "train-000004.tar").write_bytes(b"half a shard")
    [again] = build_shards(str(src), str(dest), samples_per_shard=4, seed=2, executor="ray")
    assert again.resumed_shards == 4 and again.balanced
    assert shard_bytes(dest) == shard_bytes(local)


def test_a_failing_task_reaches_the_driver_with_its_error(ray_session, tmp_path):
    src = write_solid_tree(tmp_path / "src", num_classes=2, per_class=3)
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "_journal").write_text("a file where the journal folder must go")
    with pytest.raises(OSError, match="_journal"):
        build_shards(str(src), str(dest), samples_per_shard=2, executor="ray")
    assert not (dest / "manifest.json").exists()  # the driver writes the manifest only after every shard


def test_cli_with_ray_and_an_unreachable_address_fails_fast(ray_session, tmp_path, capsys):
    from stagewise.pipeline.ray_executor import _check_reachable, connect

    src = write_solid_tree(tmp_path / "src", num_classes=2, per_class=2)
    assert cli(["build-shards", str(src), str(tmp_path / "out"), "--executor", "ray", "--no-progress"]) == 0
    assert "check: inputs 4 = written 4 + rejected 0: OK" in capsys.readouterr().out
    assert connect("127.0.0.1:1") is ray  # a running Ray is kept: the address is not dialled
    with pytest.raises(ValueError, match="127.0.0.1:1: cannot connect within"):
        _check_reachable("127.0.0.1:1")  # what connect() does first when no Ray runs here
    with pytest.raises(ValueError, match="expected auto, HOST:PORT"):
        _check_reachable("head-node")
