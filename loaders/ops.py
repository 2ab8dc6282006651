"""The image stages of the loader as small DALI graph functions, in the order they run.

Train: decode -> crop -> flip -> randaugment -> mix -> normalize.
Eval:  decode -> crop -> normalize (the window is the center crop, see `crop.center_crop`).

Mixing before normalizing gives the same result as after (normalize is affine and
the weights sum to 1) and keeps it on the cheaper side of the float conversion.
The flip costs nothing: `flip` turns the per-sample flags into a resize region that
runs right to left, and `crop`'s resize writes mirrored samples directly.

Every per-sample or per-batch value (crop window, output size, flip, RandAugment
parameters) is a DataNode fed by `fn.external_source`, so one built pipeline serves
every stage. `gpu=True` decodes with nvJPEG (`device="mixed"`) and runs the image
ops on the GPU; argument inputs stay on the CPU, as DALI requires.
"""
from __future__ import annotations

from nvidia.dali import fn, types
from nvidia.dali.pipeline import do_not_convert

from stagewise.loaders.mixup import CUTMIX, MIXUP
from stagewise.loaders.randaugment import RandAugmentConfig, apply_layer


@do_not_convert  # plain graph code: AutoGraph's transform would only cost build time
def decode(jpg, window, gpu: bool):
    """Decode only the crop window (y, x, h, w in source pixels), as RGB uint8 HWC.

    EXIF orientation is ignored so that the window, computed from the JPEG frame
    header, matches the decoded pixels (build-shards writes plain baseline JPEGs).
    """
    return fn.decoders.image_slice(
        jpg,
        window[0:2],
        window[2:4],
        axes=[0, 1],
        normalized_anchor=False,
        normalized_shape=False,
        output_type=types.RGB,
        adjust_orientation=False,
        device="mixed" if gpu else "cpu",
    )


@do_not_convert  # plain graph code: AutoGraph's transform would only cost build time
def crop(img, size, roi=None):
    """Resize the decoded window to the stage size [H, W]: the resize half of random-resized-crop.

    Linear with antialiasing, as torchvision's RandomResizedCrop (antialias=True).
    roi: (start, end) from `flip`, relative. The output stays uint8: DALI's resize with
    float output cost +0.36 core-ms per image at 128 px; a cast afterwards costs 0.02.
    """
    region = {} if roi is None else dict(roi_start=roi[0], roi_end=roi[1], roi_relative=True)
    return fn.resize(img, size=size, interp_type=types.INTERP_LINEAR, antialias=True, **region)


@do_not_convert  # plain graph code: AutoGraph's transform would only cost build time
def flip(flips):
    """Horizontal flip where `flips` (int32 per sample) is 1, as the resize region (y0, x0) -> (y1, x1).

    A region whose x runs from 1 to 0 makes `crop`'s resize mirror the sample: the flip
    is fused into the resize instead of costing a pass of its own (~0.16 core-ms at 224 px).
    """
    f = fn.cast(flips, dtype=types.FLOAT)
    zero = f * 0.0
    return fn.stack(zero, f), fn.stack(zero + 1.0, 1.0 - f)


def randaugment(img, layers: list[dict], cfg: RandAugmentConfig):
    """RandAugment layers at the stage's resolution (after the resize: 1.3-2x cheaper than before it).

    Float32 HWC in [0, 255] in and out (see randaugment.apply_layer).
    """
    for inputs in layers:
        img = apply_layer(img, inputs, cfg)
    return img


@do_not_convert
def mix_inputs() -> dict:
    """The external_source nodes of `mix`, fed by `mixup.feed_mix`."""
    def src(name: str, dtype, ndim: int):
        return fn.external_source(name=name, dtype=dtype, ndim=ndim)

    return {
        "kind": src("mix_kind", types.INT32, 0), "lam": src("mix_lam", types.FLOAT, 0),
        "perm": src("mix_perm", types.INT32, 0), "ids": src("mix_ids", types.INT32, 1),
        "anchors": src("mix_anchors", types.INT32, 2), "shapes": src("mix_shapes", types.INT32, 2),
    }


def mix(img, inputs: dict):
    """Mixup or CutMix of each sample with its batch partner (see loaders/mixup.py); float HWC in and out.

    Every sample of a batch has the same kind, so each branch sees the whole batch or
    nothing, and the permutation indices stay valid inside it.
    """
    kind = inputs["kind"]
    if kind == MIXUP:
        lam = inputs["lam"].gpu() if img.device == "gpu" else inputs["lam"]
        partner = fn.permute_batch(img, indices=inputs["perm"])
        out = img * lam + partner * (1.0 - lam)
    elif kind == CUTMIX:
        out = fn.multi_paste(img, in_ids=inputs["ids"], in_anchors=inputs["anchors"], shapes=inputs["shapes"],
                             out_anchors=inputs["anchors"])
    else:
        out = img
    return out


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
