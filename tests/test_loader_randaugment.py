"""RandAugment kernels (real DALI, CPU) against numpy versions of the reference formulas.

Each sample of one batch is routed to one op with parameters from `sample_slots`'s
own mapping, so these tests check both the magnitude -> parameter table and that
the DALI kernels compute what the table means.
"""
from __future__ import annotations

import numpy as np
import pytest
from nvidia.dali import fn, pipeline_def, types

from stagewise.loaders.randaugment import (
    AFFINE, KERNELS, REFERENCE_OPS, RandAugmentConfig, SlotParams, affine_params, apply_layer, feed_slot,
    sample_slots, scalar_param, slot_inputs,
)

SIZE = 24
CFG = RandAugmentConfig()


@pipeline_def(enable_conditionals=True)
def _one_layer():
    img = fn.external_source(name="img", dtype=types.FLOAT, ndim=3, layout="HWC")
    return apply_layer(img, slot_inputs(0), CFG)


@pytest.fixture(scope="module")
def run_layer():
    pipe = _one_layer(batch_size=len(KERNELS), num_threads=1, device_id=None, prefetch_queue_depth=1)
    pipe.build()

    def run(images: np.ndarray, params: SlotParams) -> np.ndarray:
        n = len(images)
        pad = len(KERNELS) - n  # DALI runs fixed-size batches here: pad with identity samples
        full = SlotParams.identity(len(KERNELS))
        for field in ("kernel", "mat", "p", "filt", "box"):
            getattr(full, field)[:n] = getattr(params, field)
        pipe.feed_input("img", np.concatenate([images, np.zeros((pad, *images.shape[1:]), np.float32)]))
        feed_slot(pipe, 0, full)
        (out,) = pipe.run()
        return np.stack([np.array(out[i]) for i in range(n)])

    return run


def _image(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (SIZE, SIZE, 3)).astype(np.float32)


def _params(op: str, level: float, sign: float = 1.0) -> SlotParams:
    """Parameters of one sample forced to `op`, built like sample_slots builds them."""
    f = level / 10.0
    p = SlotParams.identity(1)
    p.kernel[0] = KERNELS.index({"AutoContrast": "autocontrast", "Equalize": "equalize", "Invert": "invert",
                                 "Posterize": "posterize", "Solarize": "solarize", "SolarizeAdd": "solarize_add",
                                 "Brightness": "brightness", "Color": "color", "Contrast": "contrast",
                                 "Sharpness": "sharpness", "Cutout": "cutout"}.get(op, "affine"))
    if p.kernel[0] == AFFINE:
        p.mat[0] = affine_params(op, f, sign, SIZE, CFG)
    elif op in ("Posterize", "Solarize", "SolarizeAdd", "Brightness", "Color", "Contrast"):
        p.p[0] = scalar_param(op, f)
    elif op == "Sharpness":
        blend = f * 1.8 + 0.1
        smooth = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13
        p.filt[0] = blend * np.pad([[1.0]], 1) + (1 - blend) * smooth
    return p


def _luma(x: np.ndarray) -> np.ndarray:
    return x @ np.array([0.299, 0.587, 0.114], np.float32)


@pytest.mark.parametrize(
    "op, level, reference",
    [
        ("Invert", 10, lambda x: 255 - x),
        ("Posterize", 5, lambda x: np.floor(x / 64) * 64),  # int(0.5 * 4) = 2 bits kept
        ("Posterize", 25, lambda x: x),  # int(2.5 * 4) = 10 bits: the reference overshoots to the identity
        ("Solarize", 5, lambda x: np.where(x < 128, x, 255 - x)),  # threshold int(0.5 * 256)
        ("SolarizeAdd", 20, lambda x: np.where(x < 128, np.minimum(x + 220, 255), x)),  # no clamp: +220
        ("Brightness", 10, lambda x: np.minimum(x * 1.9, 255)),
        ("Color", 3, lambda x: np.clip(_luma(x)[..., None] + 0.64 * (x - _luma(x)[..., None]), 0, 255)),
        ("Contrast", 15, lambda x: np.clip(_luma(x).mean() + 2.8 * (x - _luma(x).mean()), 0, 255)),
    ],
)
def test_pointwise_and_blend_ops_follow_the_reference(run_layer, op, level, reference):
    x = _image(level)
    out = run_layer(x[None], _params(op, level))[0]
    np.testing.assert_allclose(out, reference(x), atol=1.0)


def test_sharpness_matches_a_blend_with_pils_smooth_filter_inside_the_border(run_layer):
    x = _image(3)
    out = run_layer(x[None], _params("Sharpness", 20))[0]  # factor 3.7: sharpening that overshoots
    smooth = np.zeros_like(x)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            smooth[1:-1, 1:-1] += x[1 + dy : SIZE - 1 + dy, 1 + dx : SIZE - 1 + dx] * (5 if dy == dx == 0 else 1)
    smooth /= 13
    expected = np.clip(smooth + 3.7 * (x - smooth), 0, 255)
    np.testing.assert_allclose(out[1:-1, 1:-1], expected[1:-1, 1:-1], atol=1.0)


def test_autocontrast_stretches_each_channel_and_equalize_spreads_values(run_layer):
    x = _image(4) * 0.5 + 60  # values in 60..187
    x[..., 2] = 100  # a flat channel stays as it is
    params = _params("AutoContrast", 10)
    eq = _params("Equalize", 10)
    both = SlotParams(*(np.concatenate([getattr(params, f), getattr(eq, f)]) for f in ("kernel", "mat", "p", "filt", "box")))
    auto, equal = run_layer(np.stack([x, x]), both)
    for c in (0, 1):
        assert auto[..., c].min() == pytest.approx(0, abs=1) and auto[..., c].max() == pytest.approx(255, abs=1)
        order = np.argsort(x[..., c], axis=None)
        assert np.all(np.diff(auto[..., c].ravel()[order]) >= -1e-3)  # monotone
    np.testing.assert_allclose(auto[..., 2], 100)
    assert equal[..., 0].max() - equal[..., 0].min() > 200  # histogram spread to the full range


def test_translate_is_a_fraction_of_the_side_and_fills_grey(run_layer):
    x = _image(5)
    out = run_layer(x[None], _params("TranslateX", 10))[0]
    shift = int(round(10 / 10 * (100 / 224) * SIZE))  # 0.45 of the side at level 10
    np.testing.assert_allclose(out[:, : SIZE - shift], x[:, shift:], atol=0)
    np.testing.assert_allclose(out[:, SIZE - shift :], 128)


def test_rotate_by_90_degrees_at_level_30_and_shear_moves_rows(run_layer):
    x = _image(6)
    rot, shear = run_layer(np.stack([x, x]), SlotParams(*(
        np.concatenate([getattr(_params("Rotate", 30), f), getattr(_params("ShearX", 10, -1.0), f)])
        for f in ("kernel", "mat", "p", "filt", "box"))))
    assert np.allclose(rot, np.rot90(x, 1, axes=(0, 1))) or np.allclose(rot, np.rot90(x, -1, axes=(0, 1)))
    # ShearX(-0.3) about the top row: row y reads source columns x - 0.3 y (nearest).
    y = 10
    src = np.floor(np.arange(SIZE) + 0.5 - 0.3 * (y + 0.5) + 0.15).astype(int)
    ok = (src >= 0) & (src < SIZE)
    np.testing.assert_allclose(shear[y, ok], x[y, src[ok]])


def test_cutout_is_a_grey_square_sized_by_the_side(run_layer):
    x = _image(7)
    rng = np.random.default_rng(0)
    params = sample_slots(rng, 400, 1, 1, 10.0, SIZE, CFG)[0]
    k = int(np.flatnonzero(params.kernel == KERNELS.index("cutout"))[0])
    one = SlotParams(*(getattr(params, f)[k : k + 1] for f in ("kernel", "mat", "p", "filt", "box")))
    y, x0, h, w = one.box[0]
    assert h == w == 2 * int(40 / 224 * SIZE)  # reference cutout_const 40 px at 224 px
    out = run_layer(x[None], one)[0]
    inside = np.zeros((SIZE, SIZE), bool)
    inside[max(int(y), 0) : int(y + h), max(int(x0), 0) : int(x0 + w)] = True
    np.testing.assert_allclose(out[inside], 128)
    np.testing.assert_allclose(out[~inside], x[~inside])


def test_sampling_draws_all_16_reference_ops_and_clamp_limits_the_level():
    rng = np.random.default_rng(1)
    slots = sample_slots(rng, 2000, 2, 2, 20.0, 224, CFG)
    counts = np.bincount(np.concatenate([s.kernel for s in slots]), minlength=len(KERNELS))
    assert counts[KERNELS.index("identity")] == 0
    assert counts[AFFINE] == pytest.approx(4000 * 5 / 16, rel=0.15)  # 5 warps of 16 ops
    assert len(REFERENCE_OPS) == 16
    assert _angle(sample_slots(np.random.default_rng(2), 200, 1, 1, 20.0, 224, CFG)[0]) == pytest.approx(60, abs=1e-3)
    timm_like = RandAugmentConfig(clamp=10.0)
    assert _angle(sample_slots(np.random.default_rng(2), 200, 1, 1, 20.0, 224, timm_like)[0]) == pytest.approx(30, abs=1e-3)
    off = sample_slots(np.random.default_rng(3), 50, 2, 1, 10.0, 224, CFG)  # stage uses 1 of 2 built layers
    assert (off[1].kernel == KERNELS.index("identity")).all()


def _angle(params: SlotParams) -> float:
    """Largest rotation angle among the samples (degrees), read back from the warp matrices."""
    rotations = [m for m in params.mat if abs(m[0, 0] - 1) > 1e-6 and abs(m[0, 1] + m[1, 0]) < 1e-5]
    return max(abs(np.degrees(np.arctan2(m[1, 0], m[0, 0]))) for m in rotations)


def _sample_slots_per_sample(rng, n, slots, ops, magnitude, size, cfg):
    """The straightforward version `sample_slots` replaced: one Python pass per sample (the bytes to keep)."""
    level = min(magnitude, cfg.clamp) if cfg.clamp is not None else magnitude
    f = level / 10.0
    smooth = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0
    delta = np.pad(np.ones((1, 1), np.float32), 1)
    out = []
    for layer in range(slots):
        params = SlotParams.identity(n)
        choice = rng.integers(0, len(REFERENCE_OPS), size=n)
        signs = np.where(rng.random(n) < 0.5, -1.0, 1.0)
        centres = rng.random((n, 2))
        if layer < ops and magnitude > 0:
            for i in range(n):
                op = REFERENCE_OPS[choice[i]]
                kernel = KERNELS.index({"AutoContrast": "autocontrast", "Equalize": "equalize", "Invert": "invert",
                                        "Posterize": "posterize", "Solarize": "solarize",
                                        "SolarizeAdd": "solarize_add", "Brightness": "brightness", "Color": "color",
                                        "Contrast": "contrast", "Sharpness": "sharpness",
                                        "Cutout": "cutout"}.get(op, "affine"))
                params.kernel[i] = kernel
                if kernel == AFFINE:
                    params.mat[i] = affine_params(op, f, signs[i], size, cfg)
                elif KERNELS[kernel] in ("posterize", "solarize", "solarize_add", "brightness", "color", "contrast"):
                    params.p[i] = scalar_param(op, f)
                elif KERNELS[kernel] == "sharpness":
                    blend = f * 1.8 + 0.1
                    params.filt[i] = blend * delta + (1 - blend) * smooth
                elif KERNELS[kernel] == "cutout":
                    pad = int(f * cfg.cutout_frac * size)
                    cy, cx = np.floor(centres[i] * size)
                    params.box[i] = (cy - pad, cx - pad, 2 * pad, 2 * pad)
        out.append(params)
    return out


@pytest.mark.parametrize("magnitude, size, ops, clamp", [(10.0, 128, 2, None), (23.5, 300, 2, None), (15.0, 224, 1, 10.0),
                                                         (0.0, 128, 2, None), (7.0, 37, 3, None)])
def test_table_driven_sampling_gives_the_per_sample_codes_bytes(magnitude, size, ops, clamp):
    cfg = RandAugmentConfig(clamp=clamp)
    for seed in range(4):
        fast = sample_slots(np.random.default_rng([seed, 3]), 256, 3, ops, magnitude, size, cfg)
        slow = _sample_slots_per_sample(np.random.default_rng([seed, 3]), 256, 3, ops, magnitude, size, cfg)
        for a, b in zip(fast, slow, strict=True):
            for field in ("kernel", "mat", "p", "filt", "box"):
                x, y = getattr(a, field), getattr(b, field)
                assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), (seed, field)
