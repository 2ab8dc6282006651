"""The progressive schedule vs the paper's Algorithm 1 and Table 6; automl, random-resize; `pipeline schedule`."""
from __future__ import annotations

import json

import pytest

from stagewise.loaders import StageParams
from stagewise.pipeline.cli import main as pipeline_main
from stagewise.model import get_variant, list_models
from stagewise.train.schedule import PRESETS, Preset, get_preset, plan, preset_for, stage_values

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
