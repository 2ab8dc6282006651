"""schedule.time_budget (train/budget.py): the duration, the prediction and the epoch choice as pure functions of
given costs (hand-computed tables), and a real run that prints and saves its plan and keeps it on --resume.

No test asserts on speed: the real run checks what is printed and saved, not how long it took.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from stagewise.train import budget, config, preflight
from stagewise.train.budget import Costs, Deadline, Rules, choose, fit_sizes, margin, parse_duration, predict
from stagewise.train.cli import main
from stagewise.train.config import ConfigError
from stagewise.train.loop import train
from stagewise.train.schedule import Preset, plan
from tests.test_train_loop import TINY, make_dataset


@pytest.mark.parametrize("text, seconds", [
    ("2h", 7200), ("45m", 2700), ("90s", 90), ("1h30m", 5400), ("1.5h", 5400), ("10m30s", 630),
    ("1h0m5s", 3605), (" 2H ", 7200),
])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "2", "h", "2d", "-1h", "1m2h", "2 h", "two hours", "1h 30m", "0m", "0s"])
def test_bad_durations_name_the_key_and_an_example(text):
    with pytest.raises(ConfigError) as err:
        parse_duration(text)
    assert "schedule.time_budget" in str(err.value) and "1h30m" in str(err.value)


# Stages of a run of 100 images, batch 10 (10 steps an epoch), 2 stages at 64 then 128 px (1 epoch: 1 stage, 128).
PRESET = Preset("t", 64, 128, 0, 0, 0, 0, 0, 0)


def layout(epochs: int):
    return plan(PRESET, epochs=epochs, n_stages=min(2, epochs), num_images=100, batch_size=10)


def costs(**changes) -> Costs:
    """10 ms per image at 64 px, 40 at 128: an epoch costs 1 s in stage 1 and 4 s in stage 2; nothing else."""
    values = dict(image_s={64: 0.01, 128: 0.04}, stage_start_s=0.0, eval_image_s=0.0, eval_start_s=0.0,
                  val_images=0, ckpt_s=0.0, setup_s=0.0, spent_s=0.0, noise=0.0)
    return Costs(**{**values, **changes})


NONE = Rules(eval="none", checkpoints=False)
EVALS = dict(eval_start_s=1.0, eval_image_s=0.01, val_images=100, ckpt_s=0.5)  # an evaluation 2 s, a checkpoint 0.5 s


@pytest.mark.parametrize("rules, max_steps, stage_s", [
    (NONE, 0, [1.0, 4.0]),
    (Rules(eval="stages"), 0, [1 + 2 + 1.0, 4 + 2 + 1.0]),  # each stage: steps, an evaluation, 2 checkpoints
    (Rules(eval="end"), 0, [1 + 1.0, 4 + 2 + 1.0]),
    (Rules(eval="stages"), 15, [1 + 2 + 1.0, 2 + 2 + 1.0]),  # stage 2 stops after 5 of its 10 steps
    (Rules(eval="stages"), 8, [0.8 + 2 + 1.0, 0.0]),  # stage 2 never runs
    (Rules(eval="none", ckpt_every=5), 0, [1 + 2.0, 4 + 2.0]),  # 2 periodic checkpoints a stage
    (Rules(eval="none", eval_points=3, checkpoints=False), 0, [1.0, 4.0]),  # 3 x 2 s more, not in a stage
])
def test_predict_counts_steps_evaluations_and_checkpoints(rules, max_steps, stage_s):
    got_stages, total = predict(layout(2), max_steps, costs(**EVALS), rules)
    assert got_stages == pytest.approx(stage_s)
    assert total == pytest.approx(sum(stage_s) + rules.eval_points * 2.0 + budget.END_S)


def test_plots_and_start_up_count():
    _, plain = predict(layout(2), 0, costs(), NONE)
    plots = Rules(eval="none", checkpoints=False, plots=True)
    _, more = predict(layout(2), 0, costs(spent_s=7.0, setup_s=2.0, stage_start_s=0.5), plots)
    assert more - plain == pytest.approx(7.0 + 2.0 + 2 * 0.5 + budget.PLOTS_S)


@pytest.mark.parametrize("noise, expected", [(0.0, 0.02), (0.02, 0.04), (0.025, 0.05), (0.05, 0.06), (0.5, 0.06)])
def test_margin_follows_the_probe_noise(noise, expected):
    assert margin(noise) == pytest.approx(expected)


# Time of E whole epochs: END_S + (stage-1 epochs) x 1 s + (stage-2 epochs) x 4 s with image costs x `scale`.
@pytest.mark.parametrize("budget_s, scale, epochs, max_steps, total", [
    # aim 58.8 (2% margin): 230 epochs = 1 + 115 x 0.1 + 115 x 0.4 = 58.5; 231 = 58.9. Within 1% of the budget
    # of the aim: whole epochs.
    (60, 0.1, 230, 0, 58.5),
    # aim 18.62: 6 epochs = 1 + 3 + 12 = 16, 7 = 20, too long; 16 is 2.6 s (> 1% of 19 s) short of the aim, so
    # steps: 7 epochs lay out 3 at 64 px (30 steps, 3 s) and 4 at 128 (0.4 s a step): 1 + 3 + 36 x 0.4 = 18.4 at
    # step 66, 18.8 at 67.
    (19, 1.0, 7, 66, 18.4),
    # aim 20.58: 7 whole epochs = 20.0 are 0.58 s short, more than 1% of 21 s: steps of 8 epochs (4 at 64 px,
    # 4 s; then 0.4 s a step): 1 + 4 + 38 x 0.4 = 20.2 at step 78, 20.6 at 79.
    (21, 1.0, 8, 78, 20.2),
    # aim 4.9: one epoch (1 stage at 128 px) = 5 s, too long; steps of it: 1 + 9 x 0.4 = 4.6, 10: 5.0.
    (5, 1.0, 1, 9, 4.6),
])
def test_choose_the_longest_run_that_fits(budget_s, scale, epochs, max_steps, total):
    c = costs(image_s={64: 0.01 * scale, 128: 0.04 * scale})
    got = choose(budget_s, c, NONE, layout)
    assert (got.epochs, got.max_steps) == (epochs, max_steps)
    assert got.total_s == pytest.approx(total)
    assert got.total_s <= budget_s * (1 - margin(0.0))


def test_whole_epochs_only_when_asked():
    got = choose(19, costs(), NONE, layout, steps_too=False)
    assert (got.epochs, got.max_steps) == (6, 0)


def test_the_deadline_guard():
    now = time.monotonic()
    assert not Deadline(at=now + 100, reserve_s=5, planned_steps=10).reached()
    assert Deadline(at=now + 5, reserve_s=10, planned_steps=10).reached()  # what follows the last step won't fit


def test_the_start_up_is_charged_once_per_command_line_process(monkeypatch):
    monkeypatch.setattr(budget, "process_seconds", lambda: 100.0)  # the process began 100 s ago
    monkeypatch.setattr(budget, "_START_UP_CHARGED", False)
    monkeypatch.setattr("sys.argv", ["pipeline", "bench-progressive"])
    entered = time.monotonic()
    assert budget.spent_since(entered) == pytest.approx(100.0, abs=10)  # its first run: from the process start
    assert budget.spent_since(time.monotonic()) < 50  # a later run in the same process: from its own call
    monkeypatch.setattr(budget, "_START_UP_CHARGED", False)
    monkeypatch.setattr("sys.argv", ["my_program.py"])
    assert budget.spent_since(time.monotonic()) < 50  # train(cfg) from a program: from the call


def test_a_budget_too_short_for_one_step():
    with pytest.raises(ConfigError, match="too short"):
        choose(10, costs(spent_s=10.0), NONE, layout)


def test_sizes_not_timed_scale_with_the_pixels():
    c = costs(image_s={64: 1.0, 128: 4.0})
    assert [c.train_s(s) for s in (32, 64, 96, 128, 256)] == pytest.approx([0.25, 1.0, 2.25, 4.0, 16.0])


def test_fit_sizes_pools_the_steps():
    line = [(s, 0.002 + 1e-6 * s * s) for s in (40, 48, 56, 64) for _ in range(3)]
    fitted, noise = fit_sizes(line)
    assert fitted[64] == pytest.approx(0.002 + 1e-6 * 64 * 64) and noise == pytest.approx(0.0, abs=1e-9)
    outlier = [(40, 1.0), (40, 1.0), (64, 0.8), (64, 0.8)]  # bigger images timed faster: no growth measurable
    fitted, noise = fit_sizes(outlier)
    assert fitted == {40: pytest.approx(0.9), 64: pytest.approx(0.9)} and noise > 0


def test_preflight_refuses_a_bad_budget_in_one_line(tmp_path, capsys):
    dest = make_dataset(tmp_path)
    code = main(TINY + ["--data", dest, "--run-dir", str(tmp_path / "run"), "--schedule.time_budget=2d"])
    err = capsys.readouterr().err
    assert code == 2 and "schedule.time_budget='2d' is not a duration" in err
    assert not (tmp_path / "run").exists()


def test_preflight_refuses_a_budget_under_several_processes(tmp_path, monkeypatch):
    dest = make_dataset(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = config.parse(TINY + ["--data", dest, "--run-dir", str(tmp_path / "run"), "--schedule.time_budget=5m"])
    with pytest.raises(preflight.PreflightError) as err:
        preflight.check(cfg)
    assert any(p.startswith("schedule.time_budget: one process only") for p in err.value.problems)


def test_a_run_prints_and_saves_its_plan_and_resume_keeps_it(tmp_path, capsys, monkeypatch):
    dest = make_dataset(tmp_path)
    run_dir = tmp_path / "run"
    args = TINY + ["--data", dest, "--run-dir", str(run_dir), "--schedule.time_budget=45s", "--schedule.stages=2",
                   "--run.eval=end"]
    budgeted = train(config.parse(args), print_config=False)
    out = capsys.readouterr().out
    saved = json.loads((run_dir / budget.PLAN_NAME).read_text())
    assert saved["budget"] == "45s" and saved["budget_s"] == 45 and saved["epochs"] >= 1
    assert set(saved["costs"]["image_s"]) and saved["costs"]["val_images"] == 8
    plan_line = next(line for line in out.splitlines() if line.startswith("budget 45s (45 s): "))
    assert f"{saved['epochs']} epoch" in plan_line and "predicted" in plan_line and "ends about" in plan_line
    assert sum(line.startswith("  stage ") for line in out.splitlines()) == len(saved["stages"])
    kept = config.read_file(str(run_dir / "config.yaml"))  # the config saved holds the chosen length
    assert (kept["schedule.epochs"], kept["schedule.max_steps"]) == (saved["epochs"], saved["max_steps"])
    steps = saved["max_steps"] or sum(s["steps"] for s in saved["stages"])
    done = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "done"]
    assert done[-1]["step"] == steps

    # The probe trains a throw-away model: the run computes what the same length given as epochs computes.
    given = train(config.parse(TINY + ["--data", dest, "--run-dir", str(tmp_path / "given"), "--schedule.stages=2",
                                       "--run.eval=end", f"--schedule.epochs={saved['epochs']}",
                                       f"--schedule.max_steps={saved['max_steps']}"]), print_config=False)
    assert given["fingerprint"] == budgeted["fingerprint"]

    def no_probe(*_args, **_kwargs):
        raise AssertionError("a resumed run must keep its plan, not probe again")

    monkeypatch.setattr(budget, "probe", no_probe)
    train(config.parse(args + ["--resume"]), print_config=False)
    out = capsys.readouterr().out
    assert f"budget 45s: the plan of {saved['planned_at']} kept" in out
    assert json.loads((run_dir / budget.PLAN_NAME).read_text()) == saved
    with pytest.raises(ConfigError, match="planned for '45s', not '30s'"):  # another budget is another run
        train(config.parse(args[:-3] + ["--schedule.time_budget=30s", "--schedule.stages=2", "--run.eval=end",
                                        "--resume"]), print_config=False)


def test_a_budget_refused_as_too_short_creates_nothing(tmp_path, capsys):
    """The probe runs before the run folder exists: the refusal leaves nothing that would block the next try."""
    dest = make_dataset(tmp_path)
    code = main(TINY + ["--data", dest, "--run-dir", str(tmp_path / "run"), "--schedule.time_budget=1s"])
    err = capsys.readouterr().err
    assert code == 2 and "schedule.time_budget=1 s is too short" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
