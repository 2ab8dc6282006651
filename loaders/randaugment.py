"""RandAugment with run-time magnitude: parameters drawn in Python, ops run in DALI.

Why not `nvidia.dali.auto_aug.rand_augment`: it needs a Python-int magnitude fixed
at build time and draws op choices and signs with DALI's own RNG, whose state a
resumed run cannot reproduce. Here every draw (op, sign, cutout center) comes from
the batch's numpy Generator, is turned into an op parameter at the stage's image
size, and reaches the pipeline through `fn.external_source`. The same built
pipeline therefore serves any magnitude and any size, and a batch is a pure
function of (seed, epoch, batch, stage).

Ops and magnitudes follow the EfficientNetV2 reference (google/automl
`efficientnetv2/autoaugment.py`, `distort_image_with_randaugment`): 16 ops drawn
uniformly per layer and image, each always applied, level L mapped with L / 10
(`_MAX_LEVEL`) and NO clamp, so Table 6's 15-25 overshoot the nominal maxima just
as they did in the paper. `clamp=10` gives timm's behaviour (level clipped at 10).

| op           | parameter at level L (f = L / 10)           | at L=10    | at L=20      |
|--------------|---------------------------------------------|------------|--------------|
| Rotate       | +-30 f degrees                              | 30 deg     | 60 deg       |
| ShearX/Y     | +-0.3 f                                     | 0.3        | 0.6          |
| TranslateX/Y | +-(100/224) f of the side (ref: 100 f px)   | 0.45 side  | 0.89 side    |
| Cutout       | square of side 2 (40/224) f of the side     | 0.36 side  | 0.71 side    |
| Color, Contrast, Brightness, Sharpness | factor 1.8 f + 0.1 | 1.9        | 3.7          |
| Posterize    | keep int(4 f) bits, at most 8               | 4 bits     | 8 (identity) |
| Solarize     | invert pixels >= int(256 f)                 | identity   | identity     |
| SolarizeAdd  | add int(110 f) to pixels < 128              | +110       | +220         |
| AutoContrast, Equalize, Invert | no parameter              |            |              |

Deviations from the reference, named:
- Translate and Cutout are fractions of the current side (the reference uses 100 px
  and 40 px at any size; 100/224 and 40/224 keep its strength at 224 px), so one
  magnitude means the same relative strength at 128 px and at 380 px.
- Contrast blends toward the mean grey level as PIL and timm do; the reference's
  TF code uses (pixel count / 256) as the "mean", a known bug that depends on size.
- Pixel values stay float32 in [0, 255] between ops; the reference truncates to uint8
  after each op. DALI's float kernels are vectorised and its float->uint8 conversion
  is not (~0.35 core-ms per 224 px image per op), so this is 2-3x cheaper on CPU.
- Equalize is DALI's (OpenCV's formula), not PIL's lookup-table rounding; Sharpness
  filters the 1-px border too (the reference keeps it).
- Magnitude 0 (or 0 ops) turns RandAugment off. In the reference, level 0 is not a
  no-op: Posterize keeps 0 bits (a black image) and Solarize inverts every pixel.
- Geometric ops use nearest-neighbour sampling with grey (128) fill, as the
  reference (tensorflow_addons' default) and torchvision's RandAugment do.

torchvision's RandAugment differs again: magnitude is a bin index out of 31, so
m=9 gives 9/30 of each op's maximum, not 9/10.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from nvidia.dali.pipeline import do_not_convert

REFERENCE_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color", "Contrast",
    "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout", "SolarizeAdd",
)  # google/automl efficientnetv2/autoaugment.py, available_ops, same order

# DALI kernels: the five warps share one affine kernel, so each layer branches 13 ways, not 16.
KERNELS = (
    "identity", "affine", "invert", "posterize", "solarize", "solarize_add", "brightness", "color",
    "contrast", "sharpness", "equalize", "autocontrast", "cutout",
)
(IDENTITY, AFFINE, INVERT, POSTERIZE, SOLARIZE, SOLARIZE_ADD, BRIGHTNESS, COLOR, CONTRAST, SHARPNESS, EQUALIZE,
 AUTOCONTRAST, CUTOUT) = range(len(KERNELS))
_KERNEL_OF = {
    "AutoContrast": AUTOCONTRAST, "Equalize": EQUALIZE, "Invert": INVERT, "Rotate": AFFINE,
    "Posterize": POSTERIZE, "Solarize": SOLARIZE, "Color": COLOR, "Contrast": CONTRAST,
    "Brightness": BRIGHTNESS, "Sharpness": SHARPNESS, "ShearX": AFFINE, "ShearY": AFFINE,
    "TranslateX": AFFINE, "TranslateY": AFFINE, "Cutout": CUTOUT, "SolarizeAdd": SOLARIZE_ADD,
}
MAX_LEVEL = 10.0  # reference `_MAX_LEVEL`: level / 10 is the fraction of each op's nominal range
_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0  # PIL's SMOOTH kernel
_DELTA = np.pad(np.ones((1, 1), np.float32), 1)
_IDENTITY_MAT = np.array([[1, 0, 0], [0, 1, 0]], np.float32)


@dataclass(frozen=True)
class RandAugmentConfig:
    clamp: float | None = None  # None: the reference (no clamp); 10.0: timm's clamp
    translate_frac: float = 100 / 224  # reference translate_const=100 px at 224 px
    cutout_frac: float = 40 / 224  # reference cutout_const=40 px at 224 px
    fill: float = 128.0  # reference replace_value
    nearest: bool = True  # nearest-neighbour warps (reference, and ~3x cheaper on CPU than linear)


@dataclass
class SlotParams:
    """Per-sample parameters of one RandAugment layer for one batch (dense arrays, batch first)."""

    kernel: np.ndarray  # int32 [N], a KERNELS index
    mat: np.ndarray  # float32 [N, 2, 3], destination -> source affine map (DALI warp_affine, inverse_map)
    p: np.ndarray  # float32 [N], the scalar of the pointwise/blend kernels, see `scalar_param`
    filt: np.ndarray  # float32 [N, 3, 3], Sharpness kernel
    box: np.ndarray  # float32 [N, 4], Cutout (y, x, h, w) in pixels

    @classmethod
    def identity(cls, n: int) -> "SlotParams":
        return cls(
            kernel=np.full(n, IDENTITY, np.int32),
            mat=np.repeat(_IDENTITY_MAT[None], n, axis=0),
            p=np.ones(n, np.float32),
            filt=np.repeat(_DELTA[None], n, axis=0),
            box=np.zeros((n, 4), np.float32),
        )


def scalar_param(op: str, f: float) -> float:
    """The one number a pointwise or blend op needs at level fraction f."""
    if op == "Posterize":
        bits = min(max(int(f * 4), 0), 8)  # reference: int(level/10 * 4); more than 8 bits is the identity
        return 2.0 ** -(8 - bits)  # y = floor(x q) / q keeps the top `bits` bits
    if op == "Solarize":
        return float(int(f * 256))  # pixels >= threshold are inverted
    if op == "SolarizeAdd":
        return float(int(f * 110))  # added to pixels < 128 (reference threshold)
    if op in ("Brightness", "Color", "Contrast"):
        return f * 1.8 + 0.1  # blend factor with black / grey / mean grey
    raise ValueError(f"{op!r} has no scalar parameter")


def affine_params(op: str, f: float, sign: float, size: int, cfg: RandAugmentConfig) -> np.ndarray:
    """Destination -> source 2x3 map in DALI's pixel-centre coordinates (x right, y down)."""
    if op == "Rotate":
        theta = math.radians(f * 30.0 * sign)
        c, s = math.cos(theta), math.sin(theta)
        centre = size / 2.0  # rotate about the image centre, as tfa.image.rotate does
        return np.array(
            [[c, -s, centre - c * centre + s * centre], [s, c, centre - s * centre - c * centre]], np.float32
        )
    if op in ("ShearX", "ShearY"):
        k = f * 0.3 * sign
        # The reference shears about the top-left pixel's centre (0.5, 0.5 here).
        if op == "ShearX":
            return np.array([[1, k, -0.5 * k], [0, 1, 0]], np.float32)
        return np.array([[1, 0, 0], [k, 1, -0.5 * k]], np.float32)
    if op in ("TranslateX", "TranslateY"):
        pixels = f * cfg.translate_frac * size * sign  # resolution-aware (reference: f * 100 px)
        if op == "TranslateX":
            return np.array([[1, 0, pixels], [0, 1, 0]], np.float32)
        return np.array([[1, 0, 0], [0, 1, pixels]], np.float32)
    raise ValueError(f"{op!r} is not an affine op")


def sample_slots(
    rng: np.random.Generator, n: int, slots: int, ops: int, magnitude: float, size: int, cfg: RandAugmentConfig
) -> list[SlotParams]:
    """Parameters for `slots` layers; layers at index >= `ops` (or magnitude 0) are identity."""
    level = min(magnitude, cfg.clamp) if cfg.clamp is not None else magnitude
    f = level / MAX_LEVEL
    out = []
    for layer in range(slots):
        params = SlotParams.identity(n)
        choice = rng.integers(0, len(REFERENCE_OPS), size=n)  # drawn even when off: keeps streams aligned
        signs = np.where(rng.random(n) < 0.5, -1.0, 1.0)
        centres = rng.random((n, 2))
        if layer < ops and magnitude > 0:
            for i in range(n):
                op = REFERENCE_OPS[choice[i]]
                kernel = _KERNEL_OF[op]
                params.kernel[i] = kernel
                if kernel == AFFINE:
                    params.mat[i] = affine_params(op, f, signs[i], size, cfg)
                elif kernel in (POSTERIZE, SOLARIZE, SOLARIZE_ADD, BRIGHTNESS, COLOR, CONTRAST):
                    params.p[i] = scalar_param(op, f)
                elif kernel == SHARPNESS:
                    blend = f * 1.8 + 0.1  # blend(smooth, image, factor) is one 3x3 kernel
                    params.filt[i] = blend * _DELTA + (1 - blend) * _SMOOTH
                elif kernel == CUTOUT:
                    pad = int(f * cfg.cutout_frac * size)  # reference: int(f * 40) px
                    cy, cx = np.floor(centres[i] * size)  # reference: uniform int centre in [0, side)
                    params.box[i] = (cy - pad, cx - pad, 2 * pad, 2 * pad)
        out.append(params)
    return out


# ---------------------------------------------------------------- DALI graph side
@do_not_convert
def slot_inputs(layer: int) -> dict:
    """The external_source nodes of one layer, fed by `feed_slot`."""
    from nvidia.dali import fn, types

    def src(field: str, dtype, ndim: int):
        return fn.external_source(name=f"ra{layer}_{field}", dtype=dtype, ndim=ndim)

    return {
        "kernel": src("kernel", types.INT32, 0),
        "mat": src("mat", types.FLOAT, 2),
        "p": src("p", types.FLOAT, 0),
        "filt": src("filt", types.FLOAT, 2),
        "box": src("box", types.FLOAT, 1),
    }


def feed_slot(pipe, layer: int, params: SlotParams) -> None:
    for field in ("kernel", "mat", "p", "filt", "box"):
        pipe.feed_input(f"ra{layer}_{field}", getattr(params, field))


def apply_layer(img, inputs: dict, cfg: RandAugmentConfig, lo: int = 0, hi: int = len(KERNELS) - 1):
    """Route each sample to its kernel by a binary tree of DALI conditionals (depth 4 for 13 kernels).

    `img` is float32 HWC with values in [0, 255]: DALI's float kernels are vectorised, its
    float -> uint8 conversion is not (~0.35 core-ms per 224 px image), so the layers stay
    in float and values are not truncated to integers between ops as in the reference.
    """
    if lo == hi:
        return _run_kernel(lo, img, inputs, cfg)
    mid = (lo + hi) // 2
    if inputs["kernel"] <= mid:
        out = apply_layer(img, inputs, cfg, lo, mid)
    else:
        out = apply_layer(img, inputs, cfg, mid + 1, hi)
    return out


@do_not_convert
def _like(node, img):
    """Tensor operands must share the image's device (argument inputs stay on the CPU)."""
    return node.gpu() if img.device == "gpu" else node


@do_not_convert
def _clip(x):
    from nvidia.dali import math as dmath

    return dmath.max(dmath.min(x, 255.0), 0.0)  # min/max: 3x cheaper than dmath.clamp on CPU


@do_not_convert  # no DataNode `if` inside: skipping AutoGraph's transform saves seconds per build
def _run_kernel(kernel: int, img, inputs: dict, cfg: RandAugmentConfig):
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    p = inputs["p"]
    if kernel == IDENTITY:
        return img
    if kernel == AFFINE:
        interp = types.INTERP_NN if cfg.nearest else types.INTERP_LINEAR
        return fn.warp_affine(img, matrix=inputs["mat"], fill_value=cfg.fill, interp_type=interp)
    if kernel == INVERT:
        return 255.0 - img
    if kernel == POSTERIZE:
        q = _like(p, img)
        return dmath.floor(img * q) / q
    if kernel == SOLARIZE:
        return img + (img >= _like(p, img)) * (255.0 - 2.0 * img)
    if kernel == SOLARIZE_ADD:
        return dmath.min(img + (img < 128.0) * _like(p, img), 255.0)
    if kernel == BRIGHTNESS:
        return dmath.min(img * _like(p, img), 255.0)
    if kernel == COLOR:
        return _clip(fn.saturation(img, saturation=p))  # = blend with the luma grey (ITU-R 601 weights)
    if kernel == CONTRAST:
        channel_mean = fn.reductions.mean(img, axes=[0, 1])
        luma = types.Constant(np.array([0.299, 0.587, 0.114], np.float32))
        grey = fn.reductions.sum(channel_mean * luma, axes=[0])  # mean grey level, as PIL's Contrast
        if img.device == "gpu":  # a GPU-resident centre cannot be an argument input
            return _clip(grey + (img - grey) * _like(p, img))
        return _clip(fn.contrast(img, contrast=p, contrast_center=grey))  # 6x cheaper than arithmetic on CPU
    if kernel == SHARPNESS:
        return _clip(fn.filter(img, _like(inputs["filt"], img)))
    if kernel == EQUALIZE:  # DALI's equalize takes uint8 only
        return fn.cast(fn.equalize(fn.cast(img, dtype=types.UINT8)), dtype=types.FLOAT)
    if kernel == AUTOCONTRAST:
        lo = fn.reductions.min(img, axes=[0, 1], keep_dims=True)
        hi = fn.reductions.max(img, axes=[0, 1], keep_dims=True)
        spread = hi > lo  # a flat channel stays as it is (reference)
        scale = spread * (255.0 / dmath.max(hi - lo, 1.0)) + (spread ^ True) * 1.0
        return (img - spread * lo) * scale
    if kernel == CUTOUT:
        box = inputs["box"]
        return fn.erase(img, anchor=box[0:2], shape=box[2:4], axes=[0, 1], fill_value=cfg.fill)
    raise ValueError(f"unknown RandAugment kernel {kernel}")
