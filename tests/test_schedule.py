"""The progressive schedule vs the paper's Algorithm 1 and Table 6; automl, random-resize; the peer schedules
ffcv and composer (issue 21); `pipeline schedule`."""
from __future__ import annotations

import json

import pytest

from stagewise.loaders import StageParams
from stagewise.pipeline.cli import main as pipeline_main
from stagewise.model import get_variant, list_models
from stagewise.train import config
from stagewise.train.schedule import (PRESETS, PeerRule, Preset, check_config, get_preset, peer_size, plan, preset_for,
                                      stage_values)

# Paper Table 6, typed in again here so that the test does not read the values it checks.
TABLE_6 = {
    "efficientnetv2_s": ((128, 300), (5, 15), (0.0, 0.0), (0.1, 0.3)),
    "efficientnetv2_m": ((128, 380), (5, 20), (0.0, 0.2), (0.1, 0.4)),
    "efficientnetv2_l": ((128, 380), (5, 25), (0.0, 0.4), (0.1, 0.5)),
}


def test_presets_are_table_6():
    assert set(PRESETS) == set(TABLE_6)
    for name, (size, ra, mix, drop) in TABLE_6.items():
        p = get_preset(name)
        assert (p.min_size, p.max_size) == size
        assert (p.min_randaug, p.max_randaug) == ra
        assert (p.min_mixup, p.max_mixup) == mix
        assert (p.min_dropout, p.max_dropout) == drop


@pytest.mark.parametrize("name", sorted(TABLE_6))
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 12])
def test_algorithm_1_every_preset_and_stage_count(name, m):
    (s0, se), (r0, re), (x0, xe), (d0, de) = TABLE_6[name]
    preset = get_preset(name)
    for i in range(m):
        ratio = i / (m - 1) if m > 1 else 1.0
        exact = s0 + (se - s0) * ratio
        v = stage_values(i, m, preset, "paper")
        if i == m - 1:
            assert v.image_size == se  # the last stage trains at exactly Se
        else:
            assert v.image_size % 8 == 0 and abs(v.image_size - exact) <= 4
        assert v.randaug_magnitude == pytest.approx(r0 + (re - r0) * ratio, abs=1e-12)
        assert v.mixup_alpha == pytest.approx(x0 + (xe - x0) * ratio, abs=1e-12)
        assert v.dropout == pytest.approx(d0 + (de - d0) * ratio, abs=1e-12)
        sp = v.loader_params(randaug_ops=2, label_smoothing=0.1)
        assert isinstance(sp, StageParams)
        assert (sp.image_size, sp.randaug_magnitude, sp.mixup_alpha, sp.randaug_ops, sp.label_smoothing) == (
            v.image_size, v.randaug_magnitude, v.mixup_alpha, 2, 0.1)
    if m > 1:  # stage 0 trains at the minimum values
        assert stage_values(0, m, preset).image_size == s0


@pytest.mark.parametrize("name", list_models())
def test_every_variant_row_gives_a_preset_from_table_6s_first_stage_to_its_own_final_values(name):
    v = get_variant(name)
    p = preset_for(v)
    assert (p.max_size, p.max_randaug, p.max_mixup, p.max_dropout) == (
        v.train_size, v.randaug_magnitude, v.mixup_alpha, v.dropout)
    (s0, _), (r0, _), (x0, _), (d0, _) = TABLE_6["efficientnetv2_s"]  # the min column, shared by all models
    assert (p.min_size, p.min_randaug, p.min_mixup, p.min_dropout) == (
        min(s0, v.train_size), min(r0, v.randaug_magnitude), min(x0, v.mixup_alpha), min(d0, v.dropout))


def test_stage_line_matches_the_issue_example():
    rows = plan(get_preset("efficientnetv2_s"), epochs=350, n_stages=4, num_images=1_281_167, batch_size=4096)
    assert [r.values.image_size for r in rows] == [128, 184, 240, 300]
    assert rows[2].line() == "stage 3/4: size 240, randaug 11.7, mixup 0.00, dropout 0.23"
    assert [r.epochs for r in rows] == [87, 88, 87, 88]  # floor(i * 350 / 4) boundaries, as the official code
    assert all(r.steps == r.epochs * (1_281_167 // 4096) for r in rows)


def test_automl_schedule_is_the_official_codes():
    p = get_preset("efficientnetv2_s")
    vals = [stage_values(i, 4, p, "automl") for i in range(4)]
    assert [v.image_size for v in vals] == [171, 214, 257, 300]  # int(128 + 172 * (i+1)/4): never 128
    assert [v.randaug_magnitude for v in vals] == pytest.approx([5, 5 + 10 / 3, 5 + 20 / 3, 15])  # np.linspace
    assert [v.dropout for v in vals] == [0.3] * 4  # the official dropout ramp is computed, then deleted
    m = get_preset("efficientnetv2_m")
    assert [stage_values(i, 4, m, "automl").mixup_alpha for i in range(4)] == pytest.approx([0, 0.2 / 3, 0.4 / 3, 0.2])


def test_random_resize_samples_sizes_and_ties_regularization_to_them():
    p = get_preset("efficientnetv2_l")
    sizes = [stage_values(i, 40, p, "random-resize", seed=3).image_size for i in range(40)]
    assert sizes == [stage_values(i, 40, p, "random-resize", seed=3).image_size for i in range(40)]  # pure
    assert all(128 <= s <= 380 and s % 8 == 0 for s in sizes)
    assert len(set(sizes)) > 10  # actually random, not a ramp
    assert sizes != sorted(sizes)
    for i, s in enumerate(sizes):
        v = stage_values(i, 40, p, "random-resize", seed=3)
        r = (s - 128) / (380 - 128)
        assert v.randaug_magnitude == pytest.approx(5 + 20 * r)
        assert v.mixup_alpha == pytest.approx(0.4 * r)
        assert v.dropout == pytest.approx(0.1 + 0.4 * r)
    other_seed = [stage_values(i, 40, p, "random-resize", seed=4).image_size for i in range(40)]
    assert other_seed != sizes


def test_vanilla_keeps_regularization_at_the_max_while_the_size_grows():
    p = get_preset("efficientnetv2_m")
    vals = [stage_values(i, 4, p, "paper", adaptive=False) for i in range(4)]
    assert [v.image_size for v in vals] == [128, 216, 296, 380]
    assert {(v.randaug_magnitude, v.mixup_alpha, v.dropout) for v in vals} == {(20, 0.2, 0.4)}


def test_random_resize_plan_uses_chunks_of_epochs():
    rows = plan(get_preset("efficientnetv2_s"), epochs=20, n_stages=4, schedule="random-resize", num_images=1000,
                batch_size=100, chunk_epochs=8)
    assert [(r.start_epoch, r.end_epoch) for r in rows] == [(0, 8), (8, 16), (16, 20)]


def test_per_stage_batch_keeps_activation_memory_constant():
    rows = plan(get_preset("efficientnetv2_s"), epochs=8, n_stages=4, num_images=100_000, batch_size=512,
                per_stage_batch=True, batch_multiple=8)
    for r in rows:
        ideal = 512 * (300 / r.values.image_size) ** 2
        assert r.batch_size % 8 == 0 and ideal - 8 < r.batch_size <= ideal
        assert r.steps_per_epoch == 100_000 // r.batch_size
    assert rows[-1].batch_size == 512
    fixed = plan(get_preset("efficientnetv2_s"), epochs=8, n_stages=4, num_images=100_000, batch_size=512)
    assert {r.batch_size for r in fixed} == {512}


def test_bad_arguments_are_rejected_with_the_value():
    p = get_preset("efficientnetv2_s")
    with pytest.raises(ValueError, match="stage must be in"):
        stage_values(4, 4, p)
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        stage_values(0, 4, p, "cosine")
    with pytest.raises(ValueError, match="unknown preset 'efficientnetv2_q'"):
        get_preset("efficientnetv2_q")
    with pytest.raises(ValueError, match="min_size <= max_size"):
        Preset("x", 300, 128, 5, 15, 0, 0, 0.1, 0.3)
    with pytest.raises(ValueError, match="stages <= epochs"):
        plan(p, epochs=3, n_stages=4, num_images=100, batch_size=10)


def test_pipeline_schedule_json(capsys):
    argv = ["schedule", "--preset", "efficientnetv2_m", "--stages", "4", "--epochs", "100", "--json"]
    assert pipeline_main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [set(r) for r in rows] == [{"stage", "image_size", "randaug_magnitude", "mixup_alpha", "dropout",
                                       "epochs", "steps", "batch_size"}] * 4
    assert [r["stage"] for r in rows] == [1, 2, 3, 4]
    assert [r["image_size"] for r in rows] == [128, 216, 296, 380]
    assert rows[-1]["randaug_magnitude"] == 20 and rows[-1]["mixup_alpha"] == 0.2 and rows[-1]["dropout"] == 0.4
    assert sum(r["epochs"] for r in rows) == 100 and rows[0]["steps"] == 25 * (1_281_167 // 4096)


def test_pipeline_schedule_table(capsys):
    assert pipeline_main(["schedule", "--preset", "efficientnetv2_s"]) == 0
    out = capsys.readouterr().out
    assert "efficientnetv2_s, paper schedule, 4 stages, 350 epochs" in out
    lines = [line.split() for line in out.splitlines() if line.split() and line.split()[0] in "1234"]
    assert [int(x[1]) for x in lines] == [128, 184, 240, 300]


# --- The peer schedules (issue 21): sizes per epoch worked out by hand from the sources' rules -------------

def _sizes(schedule, epochs, lo, hi, rule=None):
    p = Preset("t", lo, hi, 5, 15, 0, 0.2, 0.1, 0.3)
    return [peer_size(e, epochs, p, schedule, rule or PeerRule()) for e in range(epochs)]


@pytest.mark.parametrize("epochs, lo, hi, rule, expected", [
    # FFCV's own configs (rn18/rn50_16_epochs.yaml: start_ramp 11, end_ramp 13): epoch 12 interpolates to 176,
    # 176/32 = 5.5 rounds to even (6): 192, so 176 is never trained.
    (16, 160, 192, None, [160] * 12 + [192] * 4),
    # rn*_88_epochs.yaml (65, 76): 160 + 32 (e - 65)/11 reaches 5.5 * 32 between e = 70 and 71.
    (88, 160, 192, None, [160] * 71 + [192] * 17),
    # The CPU bench: 12 epochs -> start 8, end 9.5; epoch 9: 64 + 64/1.5 = 106.7 -> 96.
    (12, 64, 128, None, [64] * 9 + [96] + [128] * 2),
    (16, 128, 300, None, [128] * 12 + [224] + [300] * 3),  # epoch 12: 214 -> 6.69 * 32 -> 224
    (8, 128, 300, None, [128] * 6 + [300] * 2),  # start 5, end 6: no epoch strictly between
    (1, 64, 128, None, [128]),  # start -0.25, end -0.125: epoch 0 is past the ramp
    # Given shares: 10 epochs, ramp over epochs 2..6: 96, 128, 160 between.
    (10, 64, 192, PeerRule(ramp_start=0.2, ramp_end=0.6), [64, 64, 64, 96, 128, 160, 192, 192, 192, 192]),
    # ramp_end = 1 ends after the last epoch (FFCV's rule: epoch >= end_ramp), and 102.5..107.5 round to 96,
    # clamped up to S0 (our deviation): the run never leaves 100.
    (4, 100, 110, PeerRule(ramp_start=0, ramp_end=1), [100, 100, 100, 100]),
    (4, 100, 140, PeerRule(ramp_start=0, ramp_end=0.75), [100, 128, 128, 140]),  # 113.3, 126.7 -> 128
])
def test_ffcv_sizes(epochs, lo, hi, rule, expected):
    assert _sizes("ffcv", epochs, lo, hi, rule) == expected


@pytest.mark.parametrize("epochs, lo, hi, rule, expected", [
    # Defaults (delay 0.5, finetune 0.2), t = (e + 0.5)/E: 10 epochs, e5: t .55, ramp 1/6, scale .5833,
    # 74.7 -> 76; e6: .75 -> 96; e7: .9167 -> 117.3 -> 116; e8 (t .85) is past the ramp.
    (10, 64, 128, None, [64] * 5 + [76, 96, 116, 128, 128]),
    # 12 epochs: e6 t .5417 -> 72.9 -> 72; e7 .625 -> 90.7 -> 92; e8 .7083 -> 108.4 -> 108; e9 126.2 -> 128.
    (12, 64, 128, None, [64] * 6 + [72, 92, 108, 128, 128, 128]),
    (4, 64, 128, None, [64, 64, 92, 128]),  # e2: t .625, ramp .4167, 90.7 -> 92
    (1, 64, 128, None, [64]),  # t = .5 is the ramp's start: the initial scale
    (10, 150, 300, None, [150] * 5 + [176, 224, 276, 300, 300]),  # initial scale .5 = 150/300
    # delay + finetune = 1: a step at the delay (Composer would divide by zero).
    (10, 64, 128, PeerRule(delay_fraction=0.6, finetune_fraction=0.4), [64] * 6 + [128] * 4),
    # No delay, no finetune: the whole run ramps, so no epoch is at S0 or Se (112.5, 137.5, 162.5, 187.5 -> x4).
    (4, 100, 200, PeerRule(delay_fraction=0, finetune_fraction=0), [112, 136, 164, 188]),
])
def test_composer_sizes(epochs, lo, hi, rule, expected):
    assert _sizes("composer", epochs, lo, hi, rule) == expected


@pytest.mark.parametrize("schedule", ["ffcv", "composer"])
@pytest.mark.parametrize("adaptive", [True, False])
def test_peer_plans_merge_epochs_of_one_size_and_hold_regularization_at_the_final_values(schedule, adaptive):
    p = Preset("t", 64, 128, 5, 15, 0, 0.2, 0.1, 0.3)
    rows = plan(p, epochs=12, n_stages=4, schedule=schedule, num_images=100, batch_size=10, adaptive=adaptive)
    expected = {"ffcv": [(0, 9, 64), (9, 10, 96), (10, 12, 128)],
                "composer": [(0, 6, 64), (6, 7, 72), (7, 8, 92), (8, 9, 108), (9, 12, 128)]}[schedule]
    assert [(r.start_epoch, r.end_epoch, r.values.image_size) for r in rows] == expected
    assert {(r.values.randaug_magnitude, r.values.mixup_alpha, r.values.dropout) for r in rows} == {(15, 0.2, 0.3)}
    assert [r.n_stages for r in rows] == [len(expected)] * len(expected)  # schedule.stages (4) is not used
    assert rows[0].line() == "stage 1/%d: size 64, randaug 15.0, mixup 0.20, dropout 0.30" % len(expected)
    assert all(r.steps == r.epochs * 10 for r in rows)


@pytest.mark.parametrize("schedule, rule, message", [
    ("ffcv", PeerRule(ramp_start=0.7, ramp_end=0.5), "schedule.ramp_end=0.5 must be above schedule.ramp_start=0.7"),
    ("ffcv", PeerRule(ramp_start=0.5, ramp_end=0.5), "schedule.ramp_end=0.5 must be above"),
    ("ffcv", PeerRule(ramp_start=0.5), "go together"),
    ("ffcv", PeerRule(ramp_start=0.2, ramp_end=1.5), "schedule.ramp_end=1.5 is a share of the run"),
    ("composer", PeerRule(delay_fraction=-0.1), r"schedule.delay_fraction=-0.1 is a share of the run"),
    ("composer", PeerRule(finetune_fraction=1.2), r"schedule.finetune_fraction=1.2 is a share"),
    ("composer", PeerRule(delay_fraction=0.6, finetune_fraction=0.5), r"\+ schedule.finetune_fraction=0.5 is above 1"),
])
def test_bad_peer_settings_are_refused_naming_the_key(schedule, rule, message):
    p = get_preset("efficientnetv2_s")
    with pytest.raises(ValueError, match=message):
        plan(p, epochs=10, n_stages=4, schedule=schedule, num_images=100, batch_size=10, peer=rule)
    other = "composer" if schedule == "ffcv" else "ffcv"  # a setting the kind does not read is not checked
    assert plan(p, epochs=10, n_stages=4, schedule=other, num_images=100, batch_size=10, peer=rule)
    cfg = config.parse(["--schedule.kind=" + schedule] + [f"--schedule.{k}={v}" for k, v in vars(rule).items()])
    with pytest.raises(ValueError, match=f"^schedule.kind={schedule}: "):
        check_config(cfg.schedule)
    check_config(config.parse(["--schedule.kind=paper"] + [f"--schedule.{k}={v}" for k, v in vars(rule).items()])
                 .schedule)


def test_preflight_refuses_a_bad_peer_setting_in_one_line(tmp_path):
    from stagewise.train import preflight

    cfg = config.parse(["--data", str(tmp_path / "none"), "--run-dir", str(tmp_path / "run"),
                        "--schedule.kind=ffcv", "--schedule.ramp_start=0.8", "--schedule.ramp_end=0.3"])
    with pytest.raises(preflight.PreflightError) as info:
        preflight.check(cfg)
    mine = [p for p in info.value.problems if "ramp" in p]
    assert mine == ["schedule.kind=ffcv: schedule.ramp_end=0.3 must be above schedule.ramp_start=0.8 "
                    "(shares of the run)"]


def test_stage_values_refuses_the_peer_kinds_whose_sizes_follow_epochs():
    with pytest.raises(ValueError, match="sizes epochs, not stages"):
        stage_values(0, 4, get_preset("efficientnetv2_s"), "ffcv")


def test_pipeline_schedule_shows_the_peer_kinds(capsys):
    assert pipeline_main(["schedule", "--schedule", "ffcv", "--epochs", "16"]) == 0
    out = capsys.readouterr().out
    assert "efficientnetv2_s, ffcv schedule, 3 stages, 16 epochs" in out
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0] in "123"]
    assert [(int(x[1]), float(x[2]), int(x[5])) for x in rows] == [(128, 15.0, 12), (224, 15.0, 1), (300, 15.0, 3)]
    argv = ["schedule", "--schedule", "composer", "--epochs", "10", "--delay-fraction", "0.6", "--json"]
    assert pipeline_main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    # e6: t .65, ramp .25, scale 128/300 + (1 - 128/300) .25 = .57: 171 -> 172; e7: .8567: 257 -> 256
    assert [(r["image_size"], r["epochs"]) for r in rows] == [(128, 6), (172, 1), (256, 1), (300, 2)]
    assert pipeline_main(["schedule", "--schedule", "composer", "--delay-fraction", "0.9"]) == 2
    assert "delay_fraction=0.9 + schedule.finetune_fraction=0.2 is above 1" in capsys.readouterr().err
