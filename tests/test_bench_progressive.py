"""`pipeline bench-progressive`: a tiny end-to-end run (2 settings, 1 seed, a few steps) and the refusals."""
from __future__ import annotations

import json

import pytest

from stagewise.benchmarks import bench_progressive
from stagewise.benchmarks.datasets import MATERIALS, write_texture_task
from stagewise.pipeline.build_shards import build_shards
from stagewise.pipeline.cli import main as cli

EVAL_FIELDS = {"step", "top1", "top5", "train_seconds", "images_seen", "stage", "eval_size"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """4 texture classes, 8 train / 2 val patches each, 64 px: 4 steps of 8 images per epoch."""
    root = tmp_path_factory.mktemp("tiny")
    four = {k: MATERIALS[k] for k in sorted(MATERIALS)[:4]}
    write_texture_task(root / "src", train_per_class=8, val_per_class=2, size=64, materials=four)
    for split in ("train", "val"):
        build_shards(str(root / "src" / split), str(root / "ds"), layout="folder", split=split, workers=1)
    return root


SMALL = ["--epochs", "2", "--stages", "2", "--min-size", "32", "--max-size", "64", "--eval-size", "64",
         "--batch", "8", "--set", "data.num_threads=1"]


def test_bench_progressive_end_to_end_json_has_every_field_and_png_exists(tiny, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = cli(["bench-progressive", str(tiny / "ds"), "--settings", "fixed", "adaptive", "--seeds", "0", *SMALL,
              "--eval-points", "8", "--run-dir", str(tmp_path / "runs"), "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "final top-1" in printed and "to target" in printed and "ms/img at 32 px" in printed
    result = json.loads(out.read_text())
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # default: beside the JSON
    assert set(result["settings"]) == {"fixed", "adaptive"}
    assert result["target_top1"] == result["settings"]["fixed"]["final_top1_mean"]
    for name, s in result["settings"].items():
        for key in ("label", "final_top1_mean", "final_top1_sd", "final_top1", "train_seconds_mean",
                    "wall_seconds_mean", "time_to_target_s", "time_to_target_ratio", "curve", "runs"):
            assert key in s, (name, key)
        (run,) = s["runs"]
        assert run["steps"] == 8 and run["seed"] == 0
        assert len(run["evals"]) >= 8  # 8 evenly spaced points and the stage ends (here: every step)
        for e in run["evals"]:
            assert EVAL_FIELDS <= set(e) and e["eval_size"] == 64
        steps = [e["step"] for e in run["evals"]]
        assert steps == sorted(steps) and steps[-1] == 8
        seconds = [e["train_seconds"] for e in run["evals"]]
        assert seconds == sorted(seconds) and seconds[-1] <= run["wall_seconds"]
        assert [e["images_seen"] for e in run["evals"]] == [8 * st for st in steps]
        assert len(s["curve"]) == len(run["evals"])
        assert {"train_seconds", "top1", "top1_min", "top1_max", "images_seen"} <= set(s["curve"][0])
    assert result["settings"]["fixed"]["time_to_target_ratio"] <= 1.0  # fixed reaches its own final
    assert {e["stage"] for e in result["settings"]["adaptive"]["runs"][0]["evals"]} == {1, 2}
    cost = result["cost_ms_per_img"]
    assert (cost["smallest"]["size"], cost["largest"]["size"]) == (32, 64)
    assert cost["smallest"]["ms"] > 0 and cost["largest"]["ms"] > 0
    assert result["config"]["seeds"] == [0] and result["machine"]["cores"]
    assert "--schedule.stages=1" in result["trainer_args"]["fixed"]


def _no_training(monkeypatch):
    import stagewise.train.loop

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("training started")

    monkeypatch.setattr(stagewise.train.loop, "train", refuse)


def test_a_dest_without_val_split_is_refused_before_training(tiny, tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    build_shards(str(tiny / "src" / "train"), str(tmp_path / "only-train"), layout="folder", split="train",
                 workers=1)
    rc = cli(["bench-progressive", str(tmp_path / "only-train"), *SMALL, "--run-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "'val'" in err and str(tmp_path / "only-train") in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv, named", [
    (["--settings", "fixed", "fixd"], "'fixd'"),
    (["--settings", "adaptive", "--set", "optim.lrr=0.1"], "optim.lrr"),
])
def test_an_unknown_setting_or_key_is_refused_before_training(tiny, tmp_path, capsys, monkeypatch, argv, named):
    _no_training(monkeypatch)
    rc = cli(["bench-progressive", str(tiny / "ds"), *SMALL, *argv, "--run-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and named in err
    assert not (tmp_path / "runs").exists()


def test_time_to_target_reads_the_mean_curve():
    def run(seed, points):
        return {"seed": seed, "top1": points[-1][1], "train_seconds": points[-1][0], "wall_seconds": 0.0,
                "evals": [{"step": i + 1, "stage": 1, "train_seconds": t, "images_seen": i + 1, "top1": a}
                          for i, (t, a) in enumerate(points)], "stage_sizes": {1: 64}}
    runs = {"fixed": [run(0, [(10, 20), (20, 50)]), run(1, [(12, 30), (22, 50)])],   # final mean 50 at 21 s
            "adaptive": [run(0, [(5, 40), (10, 60)]), run(1, [(7, 50), (12, 55)])],  # mean 45 at 6 s, 57.5 at 11 s
            "small": [run(0, [(4, 40), (8, 45)])]}
    s = bench_progressive.summarize(runs, {k: k for k in runs})
    assert s["target_top1"] == 50
    assert s["settings"]["adaptive"]["time_to_target_s"] == 11
    assert s["settings"]["adaptive"]["time_to_target_ratio"] == pytest.approx(11 / 21)
    assert s["settings"]["fixed"]["time_to_target_s"] == 21
    assert s["settings"]["small"]["time_to_target_s"] is None
    assert "not reached" in bench_progressive.format_table(s)
