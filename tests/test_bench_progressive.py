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
    (["--settings", "adaptive", "--epochs", "2", "--stages", "4"], "--epochs 2 is below --stages 4"),
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


def test_peer_schedules_run_beside_adaptive_and_the_table_answers_issue_21(tiny, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = cli(["bench-progressive", str(tiny / "ds"), "--settings", "adaptive", "ffcv", "composer", "--seeds", "0",
              *SMALL, "--epochs", "4", "--max-steps", "16", "--eval-points", "4", "--run-dir", str(tmp_path / "runs"),
              "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert set(result["settings"]) == {"adaptive", "ffcv", "composer"}
    assert "--schedule.kind=ffcv" in result["trainer_args"]["ffcv"]
    assert "--schedule.kind=composer" in result["trainer_args"]["composer"]
    # 4 epochs of 4 steps, 32 -> 64 px. ffcv: start 2, end 2.5: epochs 0-2 at 32, epoch 3 at 64.
    # composer: t = .125, .375 -> 32; .625 -> ramp .4167, scale .7083, 45.3 -> 44; .875 -> 64.
    for name, sizes in (("ffcv", {1: 32, 2: 64}), ("composer", {1: 32, 2: 44, 3: 64})):
        (run,) = result["settings"][name]["runs"]
        assert run["steps"] == 16 and {int(k): v for k, v in run["stage_sizes"].items()} == sizes, name
    v = result["adaptive_vs_peer"]
    best = max(("ffcv", "composer"), key=lambda n: result["settings"][n]["final_top1_mean"])
    assert v["peer"] == best and v["peer_top1"] == result["settings"][best]["final_top1_mean"]
    assert f"adaptive vs the best peer schedule ({best}, final mean top-1 {v['peer_top1']:.1f}%)" in printed
    assert "regularization: adaptive ramps RandAugment 5 -> 15, mixup 0 -> 0, dropout 0.1 -> 0.3" in printed


def test_adaptive_against_the_best_peer_reads_the_mean_curves():
    def run(points):
        return {"seed": 0, "top1": points[-1][1], "train_seconds": points[-1][0], "wall_seconds": 0.0,
                "evals": [{"step": i + 1, "stage": 1, "train_seconds": t, "images_seen": i + 1, "top1": a}
                          for i, (t, a) in enumerate(points)], "stage_sizes": {1: 64}}
    runs = {"adaptive": [run([(10, 30), (20, 45), (30, 60)])], "ffcv": [run([(20, 40), (40, 50)])],
            "composer": [run([(25, 44), (50, 45)])]}
    v = bench_progressive.summarize(runs, {k: k for k in runs})["adaptive_vs_peer"]
    assert (v["peer"], v["peer_top1"], v["time_s"]) == ("ffcv", 50, 30)  # the best peer's final, first reached
    assert v["ratio"] == pytest.approx(30 / 40) and v["goal_met"]  # 0.75x <= 0.8x and 60 >= 50
    runs["adaptive"] = [run([(10, 30), (35, 50), (40, 52)])]
    v = bench_progressive.summarize(runs, {k: k for k in runs})["adaptive_vs_peer"]
    assert v["ratio"] == pytest.approx(35 / 40) and not v["goal_met"]  # 0.875x: too slow
    runs["adaptive"] = [run([(10, 30), (30, 49)])]
    s = bench_progressive.summarize(runs, {k: k for k in runs})
    assert s["adaptive_vs_peer"]["time_s"] is None and not s["adaptive_vs_peer"]["goal_met"]
    assert "adaptive does not reach it" in bench_progressive.format_table(s)
    del runs["ffcv"], runs["composer"]
    assert bench_progressive.summarize(runs, {k: k for k in runs})["adaptive_vs_peer"] is None


def test_a_resnet_runs_every_setting_with_sgd_and_says_it_takes_no_dropout(tiny, tmp_path, capsys):
    out = tmp_path / "bench.json"
    settings = ["fixed", "small", "vanilla", "adaptive", "random-resize", "automl", "ffcv", "composer"]
    rc = cli(["bench-progressive", str(tiny / "ds"), "--model", "torchvision:resnet18", "--settings", *settings,
              *SMALL, "--max-steps", "8", "--eval-points", "1", "--run-dir", str(tmp_path / "runs"),
              "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert set(result["settings"]) == set(settings)
    assert all(s["runs"][0]["steps"] == 8 for s in result["settings"].values())
    note = ("regularization: torchvision:resnet18 takes no dropout or stochastic depth (torchvision models have no "
            "set_dropout), so adaptive ramps RandAugment 5 -> 15, mixup 0 -> 0 only")
    assert printed.count(note) == 2  # in the header and under the table
    args = result["trainer_args"]["adaptive"]
    assert set(bench_progressive.RESNET_RECIPE) <= set(args)
    assert args.index("--optim.lr=1.6") > args.index("--optim.lr=0.064")  # the later flag wins
    assert not [a for a in args if "dropout" in a or "drop_path" in a]
    cfg_text = (tmp_path / "runs" / "adaptive-seed0" / "config.yaml").read_text()
    assert "optimizer: momentum" in cfg_text and "lr: 1.6" in cfg_text


def test_the_trainers_preflight_lays_out_the_peer_rule_it_is_given(tiny, tmp_path):
    from stagewise.train import config, preflight

    base = ["--data", str(tiny / "ds"), "--schedule.epochs=4", "--schedule.stages=8", "--optim.batch_size=8",
            "--schedule.min_size=32", "--schedule.max_size=64"]
    checked = preflight.check(config.parse(base + ["--run-dir", str(tmp_path / "a"), "--schedule.kind=ffcv",
                                                   "--schedule.ramp_start=0", "--schedule.ramp_end=0.5"]))
    # 4 epochs, ramp over epochs 0..2: epoch 1 interpolates to 48 = 1.5 x 32, which rounds to even: 64.
    assert [(sp.start_epoch, sp.end_epoch, sp.values.image_size) for sp in checked.stages] == [(0, 1, 32), (1, 4, 64)]
    assert not [n for n in checked.notes if "schedule.stages" in n]  # stages (8 > 4 epochs) is not the peers'
    checked = preflight.check(config.parse(base + ["--run-dir", str(tmp_path / "b"), "--schedule.kind=composer",
                                                   "--schedule.delay_fraction=0", "--schedule.finetune_fraction=0.5"]))
    # t = .125, .375: ramp .25, .75 -> scale .625, .875 -> 40, 56; then 64.
    assert [sp.values.image_size for sp in checked.stages] == [40, 56, 64]


def test_a_time_budget_goes_to_every_setting_and_a_bad_one_is_refused_before_training(tiny, tmp_path, capsys,
                                                                                       monkeypatch):
    from stagewise.train.config import ConfigError

    _no_training(monkeypatch)
    argv = ["bench-progressive", str(tiny / "ds"), *SMALL, "--settings", "fixed", "ffcv", "--run-dir",
            str(tmp_path / "runs")]
    assert cli(argv + ["--time-budget", "20 minutes"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--time-budget: schedule.time_budget='20 minutes' is not a duration" in err
    seen = []

    def child(run_argv, run_dir):  # noqa: ANN001, ANN202 - records what each run was given, as its own process
        seen.append((run_argv, run_dir))
        return {"steps": 1, "train_seconds": 1.0, "evals": [{"step": 1, "stage": 1, "top1": 50.0, "top5": 100.0,
                                                             "train_seconds": 1.0, "images_seen": 8}]}
    monkeypatch.setattr(bench_progressive, "train_in_child", child)
    assert cli(argv + ["--time-budget", "20m"]) == 0
    dirs = [str(tmp_path / "runs" / f"{n}-seed0") for n in ("fixed", "ffcv")]
    assert [("--schedule.time_budget=20m" in a, a[-3:], d) for a, d in seen] == [
        (True, ["--run-dir", d, "--run.seed=0"], d) for d in dirs]
    assert "--schedule.kind=ffcv" in seen[1][0]
    assert "a time budget of 20m each" in capsys.readouterr().out

    def too_short(run_argv, run_dir):  # noqa: ANN001, ANN202 - as a child whose budget preflight refused
        raise ConfigError("the trainer exited with status 2 (its message is above)")
    monkeypatch.setattr(bench_progressive, "train_in_child", too_short)
    assert cli(argv + ["--time-budget", "40s"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: bench-progressive: fixed, seed 0: the trainer exited with status 2 (its message is above)"


def test_runs_that_did_not_learn_give_no_verdict():
    def run(points):
        return {"seed": 0, "top1": points[-1][1], "train_seconds": points[-1][0], "wall_seconds": 0.0,
                "evals": [{"step": i + 1, "stage": 1, "train_seconds": t, "images_seen": i + 1, "top1": a}
                          for i, (t, a) in enumerate(points)], "stage_sizes": {1: 64}}
    chance = [(1, 10.0), (3, 10.0)]  # every setting at chance: each "reaches" fixed's final at its first point
    s = bench_progressive.summarize({"fixed": [run(chance)], "adaptive": [run(chance)], "ffcv": [run(chance)]},
                                    {"fixed": "fixed", "adaptive": "adaptive", "ffcv": "ffcv"})
    table = bench_progressive.format_table(s)
    assert not s["learned"] and "these runs did not learn" in table and "lower: no verdict" in table
    s = bench_progressive.summarize({"fixed": [run([(1, 10.0), (3, 40.0)])], "adaptive": [run([(1, 20.0), (2, 45.0)])],
                                     "ffcv": [run([(1, 10.0), (3, 30.0)])]},
                                    {"fixed": "fixed", "adaptive": "adaptive", "ffcv": "ffcv"})
    assert s["learned"] and "did not learn" not in bench_progressive.format_table(s)
