"""The DALI op functions of the loader's graph, in the order they run.

Train: decode -> crop (flip fused) -> randaugment -> mix -> normalize.
Eval:  decode -> crop (center) -> normalize (the window is the center crop, see `crop.center_crop`).

Mixing before normalizing gives the same result as after (normalize is affine and
the weights sum to 1) and keeps it on the cheaper side of the float conversion.
The flip costs nothing: the crop's resize region runs right to left for mirrored
samples, so the resize writes them mirrored directly.

Every per-sample or per-batch value (JPEG bytes, crop window, resize region, output
size, RandAugment parameters, mix draws) is a DataNode fed by `fn.external_source`
(with no_copy: the runner keeps each fed array alive until its batch is out), so one
built pipeline serves every stage. On the GPU (`gpu=True`) the decoder is nvJPEG
(`device="mixed"`) and the image ops run on the GPU; argument inputs stay on the CPU,
as DALI requires.
"""
from __future__ import annotations

from nvidia.dali import fn, types
from nvidia.dali.pipeline import do_not_convert

from stagewise.loaders.inputs import LAYOUTS, MIX_ANCHORS, MIX_IDS, MIX_KIND, MIX_LAM, MIX_PERM, MIX_SHAPES, SPECS, mix_names
from stagewise.loaders.mixup import CUTMIX, MIXUP
from stagewise.loaders.randaugment import (
    RandAugmentConfig, apply_layer, apply_layer_branchless, clip, shared_inputs, slot_inputs,
)


@do_not_convert  # plain graph code: AutoGraph's transform would only cost build time
def source(name: str, device: str = "cpu"):
    """The input `name` as declared in loaders/inputs.py. CPU inputs are shared, not copied (no_copy);
    a GPU input is copied from the host array."""
    dtype, ndim = SPECS[name]
    return fn.external_source(name=name, dtype=getattr(types, dtype), ndim=ndim, no_copy=device == "cpu",
                              device=device, layout=LAYOUTS.get(name))


@do_not_convert
def decode(jpg, window, gpu: bool, hints: dict):
    """RGB uint8 HWC. `window` (y, x, h, w in source pixels): decode only that region; None: the whole image.

    EXIF orientation is ignored so that the window, computed from the JPEG frame
    header, matches the decoded pixels (build-shards writes plain baseline JPEGs).
    `hints`: the mixed decoder's arguments (hw_decoder_load, preallocation hints); GPU only.
    """
    extra = dict(hints) if gpu else {}
    common = dict(output_type=types.RGB, adjust_orientation=False, device="mixed" if gpu else "cpu", **extra)
    if window is None:
        return fn.decoders.image(jpg, **common)
    return fn.decoders.image_slice(jpg, window[0:2], window[2:4], axes=[0, 1], normalized_anchor=False,
                                   normalized_shape=False, **common)


@do_not_convert
def crop(img, size, start=None, end=None, relative: bool = True, dtype=None):
    """Resize a region of the decoded image to the stage size [H, W]: the resize half of random-resized-crop.

    Linear with antialiasing, as torchvision's RandomResizedCrop (antialias=True). start/end:
    the region (y, x) -> (y, x); relative to the decoded window, or in source pixels for a whole
    decoded image. A region whose x runs backwards mirrors the sample. The CPU output stays uint8:
    DALI's resize with float output cost +0.36 core-ms per image at 128 px; a cast afterwards 0.02.
    """
    region = {} if start is None else dict(roi_start=start, roi_end=end, roi_relative=relative)
    typed = {} if dtype is None else dict(dtype=dtype)
    return fn.resize(img, size=size, interp_type=types.INTERP_LINEAR, antialias=True, **region, **typed)


def randaugment(img, cfg: RandAugmentConfig, layers: int, *, branchless: bool, compact: bool, size=None):
    """RandAugment layers at the stage's resolution (after the resize: 1.3-2x cheaper than before it).

    Float32 HWC in [0, 255] in and out. Tree (conditionals) or branchless (every kernel on the
    whole batch, then a pick); compact: the GPU formulas, one clamp per layer.
    """
    shared = shared_inputs() if branchless and layers else {}
    for k in range(layers):
        inputs = {**slot_inputs(k, branchless=branchless), **shared}
        if branchless:
            img = apply_layer_branchless(img, inputs, size, cfg)
        elif compact:
            img = clip(apply_layer(img, inputs, cfg, compact=True))
        else:
            img = apply_layer(img, inputs, cfg)
    return img


@do_not_convert
def mix_inputs(branchless: bool = False) -> dict:
    """The external_source nodes of `mix` / `mix_branchless` by input name, fed from `mixup.mix_feeds`
    (all on the CPU: on the GPU, `.gpu()` moves the lambda on DALI's own stream)."""
    return {name: source(name) for name in mix_names(branchless)}


def mix(img, inputs: dict, compact: bool = False):
    """Mixup or CutMix of each sample with its batch partner (see loaders/mixup.py); float HWC in and out.

    Every sample of a batch has the same kind, so each branch sees the whole batch or
    nothing, and the permutation indices stay valid inside it.
    """
    kind = inputs[MIX_KIND]
    if kind == MIXUP:
        lam = inputs[MIX_LAM].gpu() if img.device == "gpu" else inputs[MIX_LAM]
        partner = fn.permute_batch(img, indices=inputs[MIX_PERM])
        out = partner + (img - partner) * lam if compact else img * lam + partner * (1.0 - lam)
    elif kind == CUTMIX:
        out = _paste(img, inputs)
    else:
        out = img
    return out


@do_not_convert
def mix_branchless(img, inputs: dict):
    """Mixup then CutMix on every batch, each an exact no-op when the batch does not use it.

    Mixup: partner + (x - partner) lam, with partner = x itself (identity permutation) on
    batches that do not mix up, which gives x exactly. CutMix: the partner's box pasted over
    the whole sample, an empty box on batches without CutMix.
    """
    partner = fn.permute_batch(img, indices=inputs[MIX_PERM])
    lam = inputs[MIX_LAM] if inputs[MIX_LAM].device == img.device else inputs[MIX_LAM].gpu()
    return _paste(partner + (img - partner) * lam, inputs)


@do_not_convert
def _paste(img, inputs: dict):
    return fn.multi_paste(img, in_ids=inputs[MIX_IDS], in_anchors=inputs[MIX_ANCHORS], shapes=inputs[MIX_SHAPES],
                          out_anchors=inputs[MIX_ANCHORS])


@do_not_convert  # plain graph code: AutoGraph's transform would only cost build time
def normalize(img, mean: tuple[float, float, float], std: tuple[float, float, float], channels_last: bool):
    """float32 (x / 255 - mean) / std, CHW, or HWC when the caller wants channels_last memory."""
    return fn.crop_mirror_normalize(
        img,
        dtype=types.FLOAT,
        output_layout="HWC" if channels_last else "CHW",
        mean=[255.0 * m for m in mean],  # mean/std are given on the 0..1 scale
        std=[255.0 * s for s in std],
    )
