"""RandAugment with run-time magnitude: parameters drawn in Python, ops run in DALI.

Why not `nvidia.dali.auto_aug.rand_augment`: it needs a Python-int magnitude fixed
at build time and draws op choices and signs with DALI's own RNG, whose state a
resumed run cannot reproduce. Here every draw (op, sign, cutout center) comes from
the step's numpy Generator (a row per slot of the global batch), is turned into an op parameter at the stage's image
size, and reaches the pipeline through `fn.external_source`. The same built
pipeline therefore serves any magnitude and any size, and a batch is a pure
function of (seed, epoch, global step, slot, stage).

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

import functools
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


@dataclass(frozen=True)
class _Tables:
    """Every parameter a layer can draw, for one (magnitude, size, config): indexed by reference op (and sign)."""

    kernel: np.ndarray  # int32 [16]
    mat: np.ndarray  # float32 [16, 2, 2, 3]: [op, 0 for sign -1 / 1 for sign +1]
    p: np.ndarray  # float32 [16]
    filt: np.ndarray  # float32 [16, 3, 3]
    pad: int  # Cutout half side, px


@functools.lru_cache(maxsize=64)
def _tables(magnitude: float, size: int, cfg: RandAugmentConfig) -> _Tables:
    """The per-op parameters, computed with exactly the expressions `affine_params`/`scalar_param` use per sample."""
    level = min(magnitude, cfg.clamp) if cfg.clamp is not None else magnitude
    f = level / MAX_LEVEL
    n_ops = len(REFERENCE_OPS)
    kernel = np.array([_KERNEL_OF[op] for op in REFERENCE_OPS], np.int32)
    mat = np.repeat(np.repeat(_IDENTITY_MAT[None, None], 2, axis=1), n_ops, axis=0)
    p = np.ones(n_ops, np.float32)
    filt = np.repeat(_DELTA[None], n_ops, axis=0)
    for o, op in enumerate(REFERENCE_OPS):
        k = kernel[o]
        if k == AFFINE:
            for s, sign in enumerate((np.float64(-1.0), np.float64(1.0))):  # np.where's float64 signs, as drawn
                mat[o, s] = affine_params(op, f, sign, size, cfg)
        elif k in (POSTERIZE, SOLARIZE, SOLARIZE_ADD, BRIGHTNESS, COLOR, CONTRAST):
            p[o] = scalar_param(op, f)
        elif k == SHARPNESS:
            blend = f * 1.8 + 0.1  # blend(smooth, image, factor) is one 3x3 kernel
            filt[o] = blend * _DELTA + (1 - blend) * _SMOOTH
    for array in (kernel, mat, p, filt):
        array.flags.writeable = False  # shared by every batch through the cache
    return _Tables(kernel, mat, p, filt, int(f * cfg.cutout_frac * size))  # reference: int(f * 40) px


def sample_slots(
    rng: np.random.Generator, n: int, slots: int, ops: int, magnitude: float, size: int, cfg: RandAugmentConfig,
    keep: slice | None = None,
) -> list[SlotParams]:
    """Parameters for `slots` layers; layers at index >= `ops` (or magnitude 0) are identity.

    Drawn for n samples (a global batch), one value per sample per draw; the samples `keep`
    (default all) are returned, so a rank's slots get the values they get on any world size.

    Table-driven: each layer's parameters are gathered from `_tables` by the drawn op and sign, which
    gives the same float32 values as computing them per sample (tests/test_loader_randaugment.py
    compares the two on every op, sign and clamp).
    """
    tables = _tables(float(magnitude), int(size), cfg) if ops > 0 and magnitude > 0 else None
    keep = slice(0, n) if keep is None else keep
    kept = len(range(n)[keep])
    out = []
    for layer in range(slots):
        choice = rng.integers(0, len(REFERENCE_OPS), size=n)[keep]  # drawn even when off: keeps streams aligned
        plus = rng.random(n)[keep] >= 0.5  # sign +1 (the per-sample code: -1 where u < 0.5)
        centres = rng.random((n, 2))[keep]
        if tables is None or layer >= ops:
            out.append(SlotParams.identity(kept))
            continue
        kernel = tables.kernel[choice]
        box = np.zeros((kept, 4), np.float32)
        cut = kernel == CUTOUT
        if cut.any():
            pad = tables.pad
            corner = np.floor(centres[cut] * size) - pad  # reference: uniform int centre in [0, side)
            box[cut, 0:2] = corner
            box[cut, 2:4] = 2 * pad
        out.append(SlotParams(kernel=kernel, mat=tables.mat[choice, plus.astype(np.intp)], p=tables.p[choice],
                              filt=tables.filt[choice], box=box))
    return out


# ---------------------------------------------------------------- compact formulas (the GPU graph)
# The GPU graph computes every kernel for the whole batch and picks each sample's result
# (`apply_layer_branchless`); its formulas are written for few operators, and the layer's
# result is clamped to [0, 255] once, after the pick, instead of inside each kernel. The
# same formulas routed by the conditional tree (`apply_layer(..., compact=True)`) give
# bit-identical batches (tested in CPU mode), which proves the pick exact. Against the CPU
# formulas they differ only by float rounding (tested: see docs/loader.md).
#
# Candidates of the pick, in order; Invert is Solarize with threshold 0 (|x - 255| = 255 - x exactly).
CANDIDATES = ("identity", "affine", "solarize", "posterize", "solarize_add", "brightness", "color", "contrast",
              "sharpness", "equalize", "autocontrast", "cutout")
_CANDIDATE_OF_KERNEL = np.array([CANDIDATES.index(k if k != "invert" else "solarize") for k in KERNELS], np.int32)


def compact_p(kernel: np.ndarray, p: np.ndarray) -> np.ndarray:
    """`p` in the compact formulas' terms: Posterize takes the step m = 1 / q; Invert the threshold 0."""
    out = p.copy()
    post = kernel == POSTERIZE
    out[post] = 1.0 / p[post]  # q = 2^-k, so 1 / q = 2^k exactly
    out[kernel == INVERT] = 0.0
    return out


def branchless_inputs(slots: list[SlotParams], size: int) -> dict[str, np.ndarray]:
    """Every layer's inputs for `apply_layer_branchless`.

    Per layer: the pick (the row offset of the sample's candidate in the stack), the warp matrix,
    `p` and the Cutout corner. Shared by all layers: the Sharpness filter and the Cutout side,
    which depend on the magnitude and size only (every sample computes every kernel here; only
    the samples that drew one keep its result, and those all have these same values).
    """
    out: dict[str, np.ndarray] = {}
    n = len(slots[0].kernel) if slots else 0
    filt = np.repeat(_DELTA[None], n, axis=0)
    cut = np.zeros((n, 2), np.float32)
    for k, params in enumerate(slots):
        pick = np.zeros((n, 2), np.float32)
        pick[:, 0] = _CANDIDATE_OF_KERNEL[params.kernel] * size
        out[f"ra{k}_pick"], out[f"ra{k}_mat"] = pick, params.mat
        out[f"ra{k}_p"] = compact_p(params.kernel, params.p)
        out[f"ra{k}_cut_anchor"] = np.ascontiguousarray(params.box[:, 0:2])
        sharp = np.flatnonzero(params.kernel == SHARPNESS)
        if len(sharp):
            filt[:] = params.filt[sharp[0]]
        cuts = np.flatnonzero(params.kernel == CUTOUT)
        if len(cuts):
            cut[:] = params.box[cuts[0], 2:4]
    out["ra_filt"], out["ra_cut_shape"] = filt, cut
    return out


def tree_inputs(params: SlotParams, compact: bool) -> dict[str, np.ndarray]:
    p = compact_p(params.kernel, params.p) if compact else params.p
    return {"kernel": params.kernel, "mat": params.mat, "p": p, "filt": params.filt, "box": params.box}


# ---------------------------------------------------------------- DALI graph side
_TREE_FIELDS = {"kernel": ("INT32", 0), "mat": ("FLOAT", 2), "p": ("FLOAT", 0), "filt": ("FLOAT", 2),
                "box": ("FLOAT", 1)}
_BRANCHLESS_FIELDS = {"pick": ("FLOAT", 1), "mat": ("FLOAT", 2), "p": ("FLOAT", 0), "cut_anchor": ("FLOAT", 1)}
_SHARED_FIELDS = {"filt": ("FLOAT", 2), "cut_shape": ("FLOAT", 1)}  # branchless: one input for all layers


def input_names(layers: int, branchless: bool) -> list[str]:
    names = [f"ra{k}_{field}" for k in range(layers) for field in (_BRANCHLESS_FIELDS if branchless else _TREE_FIELDS)]
    return names + ([f"ra_{field}" for field in _SHARED_FIELDS] if branchless and layers else [])


@do_not_convert
def slot_inputs(layer: int, branchless: bool = False) -> dict:
    """The external_source nodes of one layer (fed with no_copy: the arrays stay alive in the runner's flight)."""
    fields = _BRANCHLESS_FIELDS if branchless else _TREE_FIELDS
    return {field: _source(f"ra{layer}_{field}", dtype, ndim) for field, (dtype, ndim) in fields.items()}


@do_not_convert
def shared_inputs() -> dict:
    """The branchless graph's inputs common to all layers."""
    return {field: _source(f"ra_{field}", dtype, ndim) for field, (dtype, ndim) in _SHARED_FIELDS.items()}


@do_not_convert
def _source(name: str, dtype: str, ndim: int):
    from nvidia.dali import fn, types

    return fn.external_source(name=name, dtype=getattr(types, dtype), ndim=ndim, no_copy=True)


def feed_slot(pipe, layer: int, params: SlotParams) -> None:
    """Feeds one tree layer with the CPU formulas' parameters (the kernel tests' helper)."""
    for field, array in tree_inputs(params, compact=False).items():
        pipe.feed_input(f"ra{layer}_{field}", array)


def apply_layer(img, inputs: dict, cfg: RandAugmentConfig, compact: bool = False, lo: int = 0,
                hi: int = len(KERNELS) - 1):
    """Route each sample to its kernel by a binary tree of DALI conditionals (depth 4 for 13 kernels).

    `img` is float32 HWC with values in [0, 255]: DALI's float kernels are vectorised, its
    float -> uint8 conversion is not (~0.35 core-ms per 224 px image), so the layers stay
    in float and values are not truncated to integers between ops as in the reference.
    compact=True uses the compact formulas; the caller clamps the layer's result (`clip`).
    """
    if lo == hi:
        return (_compact_kernel if compact else _run_kernel)(lo, img, inputs, cfg)
    mid = (lo + hi) // 2
    if inputs["kernel"] <= mid:
        out = apply_layer(img, inputs, cfg, compact, lo, mid)
    else:
        out = apply_layer(img, inputs, cfg, compact, mid + 1, hi)
    return out


@do_not_convert
def _like(node, img):
    """Tensor operands must share the image's device (argument inputs stay on the CPU)."""
    return node.gpu() if img.device == "gpu" else node


@do_not_convert
def _clip(x):
    from nvidia.dali import math as dmath

    return dmath.max(dmath.min(x, 255.0), 0.0)  # min/max: 3x cheaper than dmath.clamp on CPU


@do_not_convert
def clip(x):
    """[0, 255] in one operator (the compact formulas' single clamp per layer)."""
    from nvidia.dali import math as dmath

    return dmath.clamp(x, 0.0, 255.0)


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


# Each compact kernel, without its clamp (the layer clamps once). `p` is already on the image's device.
@do_not_convert
def _compact(name: str, img, p, inputs: dict, cfg: RandAugmentConfig):
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    if name == "identity":
        return img
    if name == "affine":
        interp = types.INTERP_NN if cfg.nearest else types.INTERP_LINEAR
        return fn.warp_affine(img, matrix=inputs["mat"], fill_value=cfg.fill, interp_type=interp)
    if name == "invert":
        return 255.0 - img
    if name == "solarize":  # pixels >= t inverted: |x - 255| = 255 - x there, |x| = x elsewhere
        return dmath.abs(img - (img >= p) * 255.0)
    if name == "posterize":  # p = 2^k: x - x mod 2^k = floor(x / 2^k) 2^k exactly
        return img - img % p
    if name == "solarize_add":
        return img + (img < 128.0) * p
    if name == "brightness":
        return img * p
    if name == "color":
        return fn.saturation(img, saturation=inputs["p"])  # argument input: the CPU node
    if name == "contrast":  # the mean of the luma image (saturation 0: every channel the ITU-R 601 luma)
        grey = fn.reductions.mean(fn.saturation(img, saturation=0.0))
        return grey + (img - grey) * p
    if name == "sharpness":
        return fn.filter(img, inputs["filt"])  # the GPU filter copies its CPU filter input itself
    if name == "equalize":
        return fn.cast(fn.equalize(fn.cast(img, dtype=types.UINT8)), dtype=types.FLOAT)
    if name == "autocontrast":  # flat channels: x - lo = 0 there, and lo * (d <= 0) puts x back
        lo = fn.reductions.min(img, axes=[0, 1], keep_dims=True)
        hi = fn.reductions.max(img, axes=[0, 1], keep_dims=True)
        d = hi - lo
        return (img - lo) * (255.0 / dmath.max(d, 1.0)) + lo * (d <= 0.0)
    if name == "cutout":
        anchor, shape = (inputs["box"][0:2], inputs["box"][2:4]) if "box" in inputs else (
            inputs["cut_anchor"], inputs["cut_shape"])
        return fn.erase(img, anchor=anchor, shape=shape, axes=[0, 1], fill_value=cfg.fill)
    raise ValueError(f"unknown compact RandAugment kernel {name!r}")


@do_not_convert
def _compact_kernel(kernel: int, img, inputs: dict, cfg: RandAugmentConfig):
    return _compact(KERNELS[kernel], img, _like(inputs["p"], img), inputs, cfg)


@do_not_convert
def apply_layer_branchless(img, inputs: dict, size, cfg: RandAugmentConfig):
    """Every candidate on the whole batch, stacked along H; each sample's own rows picked by one slice.

    `size` is the stage's [S, S] (the `size` input): the slice takes S x S at row offset
    candidate x S, an exact copy. Then one clamp for the layer. No conditionals.
    """
    from nvidia.dali import fn

    p = _like(inputs["p"], img)
    outs = [_compact(name, img, p, inputs, cfg) for name in CANDIDATES]
    stacked = fn.cat(*outs, axis=0)
    picked = fn.slice(stacked, inputs["pick"], size, axes=[0, 1], normalized_anchor=False, normalized_shape=False)
    return clip(picked)
