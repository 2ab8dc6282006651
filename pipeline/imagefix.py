"""Turn any input file into a baseline RGB JPEG, or reject it with a reason.

Baseline RGB JPEGs that need no change are copied byte for byte (no quality
loss, and fast). YCbCr JPEGs that must be resized or made baseline go through
pipeline/_jpegraw.c, which works on the stored Y, Cb and Cr planes (no RGB
round trip) where the extension was built; everything else is decoded with
Pillow (or Pillow-SIMD) and re-encoded. Each change is named, so the build
report can count fixes by kind:

| fix               | when                                                        |
|-------------------|-------------------------------------------------------------|
| cmyk              | CMYK JPEG (nvJPEG and most readers want RGB)                |
| grayscale         | L / 1-bit images                                            |
| 16bit             | 16-bit images, scaled to 8 bits                             |
| palette           | P images                                                    |
| alpha             | RGBA / LA / PA and palette transparency, composited on white|
| colorspace        | any other mode (LAB, YCbCr, HSV, ...)                       |
| not_jpeg          | PNG or any other format, whatever the file name says        |
| progressive       | progressive JPEG: nvJPEG's hardware decoder takes baseline  |
| non_baseline      | other non-baseline JPEG (extended, lossless, arithmetic)    |
| exif_orientation  | EXIF orientation other than 1, applied to the pixels        |
| resized           | longer side over --max-side                                 |

Rejection reasons have the form "<category>: <detail>" so reports can group them.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from stagewise.shards.jpeg import DEFAULT_MAX_PIXELS, SOF_BASELINE, SOF_PROGRESSIVE, frame_marker

try:  # optional C extension, built by `pip install` where libjpeg's headers are
    from stagewise.pipeline import _jpegraw
except ImportError:
    _jpegraw = None

_ORIENTATION_TAG = 0x0112  # EXIF
# EXIF orientation (EXIF 2.3, tag 0x0112) -> the transpose that shows the image upright.
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}
# Downscaling quality rule. libjpeg can decode at 1/2, 1/4 or 1/8 scale in the
# DCT domain, far cheaper than a full decode, but its block-wise filter aliases
# more than Lanczos. So JPEGs are decoded at the smallest such scale that stays
# >= _DRAFT_GAP x the target size, and Lanczos does the rest (Pillow's
# thumbnail() takes the same two steps, with the same default gap). Measured on
# 80 native-detail 1000x750 photos (`bench-build --make-input`), 1/2-scale
# decode + Lanczos to 250 px (gap 2) vs Lanczos from the full decode: luma PSNR
# 46.7 dB median (44.2 worst), closer than Pillow's bicubic is (44.1 dB). After
# the quality-90 encode, luma ends 0.7 dB (1.05 worst) further from the full
# Lanczos result than that result's own JPEG; gap 3 costs 0.2 dB but drafts
# far less often (2048 px -> 512 px never), gap 1.5 costs 1.7 dB.
_DRAFT_GAP = 2.0
# Lanczos after an integer box reduction when the remaining ratio is >= this;
# Pillow's docs: from 3 on, "indistinguishable from fair resampling in most cases".
_RESIZE_GAP = 3.0


class Rejected(Exception):
    """An input that cannot become a sample; str() is the reason for the report."""


@dataclass(frozen=True)
class FixedImage:
    jpg: bytes
    width: int
    height: int
    fixes: tuple[str, ...]  # empty: copied byte for byte


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise Rejected("empty file: 0 bytes")
    Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow's own guard, in line with ours (it raises at twice this)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we reject those below, with a reason
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise Rejected("not an image: format not recognised") from None
    except Image.DecompressionBombError as exc:
        raise Rejected(f"decompression bomb: {exc}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise Rejected(f"corrupt image: {exc}") from None
    w, h = im.size
    if w * h > max_pixels:
        raise Rejected(f"decompression bomb: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} (--max-pixels)")
    if w == 0 or h == 0:
        raise Rejected(f"corrupt image: size {w}x{h}")
    return im


def _load(im: Image.Image) -> None:
    try:
        im.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise Rejected(f"corrupt image: {exc}") from None


def _to_rgb(im: Image.Image, fixes: list[str]) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "CMYK":
        fixes.append("cmyk")
        return im.convert("RGB")
    if mode in ("L", "1"):
        fixes.append("grayscale")
        return im.convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        fixes.append("16bit")
        import numpy as np  # here only: keeps numpy out of every worker's start-up

        arr = np.asarray(im, dtype=np.int64)
        arr = np.clip(arr >> 8 if arr.max() > 255 else arr, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P":
        fixes.append("palette")
        if "transparency" not in im.info:
            return im.convert("RGB")
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        fixes.append("alpha")
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    fixes.append("colorspace")
    return im.convert("RGB")


def _has_end_marker(data: bytes) -> bool:
    """A complete JPEG ends with EOI (FF D9), possibly followed by padding."""
    return data.rstrip(b"\x00\n\r ").endswith(b"\xff\xd9")


def reencode_path() -> str:
    """Which code re-encodes YCbCr JPEGs here, for `pipeline --version` and bench-build."""
    # pipeline._jpegraw is built at install where a C compiler and libjpeg's headers are
    return "re-encode: YCbCr planes in C" if _jpegraw is not None else "re-encode: Pillow RGB (no _jpegraw)"


def _dct_denominator(w: int, h: int, size: tuple[int, int]) -> int:
    """The DCT-domain scale 1/n (n in 8, 4, 2, 1) that Image.draft picks for the _DRAFT_GAP rule."""
    fit = min(w // int(size[0] * _DRAFT_GAP), h // int(size[1] * _DRAFT_GAP))
    return next((n for n in (8, 4, 2) if fit >= n), 1)


def normalize_image(data: bytes, *, max_side: int | None, quality: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                    decode_copies: bool = True, planar: bool = True) -> FixedImage:
    """A baseline RGB JPEG for `data`, or Rejected with the reason.

    `decode_copies=False` trusts the structure of files that are copied byte
    for byte (headers parse, frame is baseline RGB, the file ends with EOI)
    without decoding their entropy-coded data: close to disk speed, but a
    corrupt scan inside a well-formed file is then found only by verify-shards.
    `planar=False` re-encodes YCbCr JPEGs through Pillow's RGB path even when
    the C extension is built (for comparison; the results differ by rounding).
    """
    im = _open(data, max_pixels)
    w, h = im.size
    orientation = im.getexif().get(_ORIENTATION_TAG, 1) if im.format in ("JPEG", "MPO") else 1
    fits = max_side is None or max(w, h) <= max_side
    is_jpeg = im.format == "JPEG"
    sof = frame_marker(data) if is_jpeg else None
    if is_jpeg and im.mode == "RGB" and orientation in (1, None) and fits and sof == SOF_BASELINE:
        # Fast path: prove it decodes (the 1/8-scale draft decodes every
        # coefficient but skips most of the IDCT), then copy the bytes as they are.
        if decode_copies:
            im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
            _load(im)
        elif not _has_end_marker(data):
            raise Rejected("corrupt image: truncated (no JPEG end-of-image marker)")
        return FixedImage(data, w, h, ())

    fixes: list[str] = []
    if not is_jpeg:
        fixes.append("not_jpeg")
    elif sof != SOF_BASELINE:
        fixes.append("progressive" if sof in SOF_PROGRESSIVE else "non_baseline")
    turn = orientation not in (1, None)
    size = box = None
    if not fits:  # the target, in the stored orientation: the EXIF turn comes last, on fewer pixels
        scale = max_side / max(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if planar and _jpegraw is not None and is_jpeg and im.mode == "RGB" and not turn:
        # YCbCr planes in, YCbCr planes out (pipeline/_jpegraw.c); None for what it does not take
        target = size or (w, h)
        try:  # ValueError: over a limit the C checks itself (its pixel ceiling, max_pixels, progressive scans)
            jpg = _jpegraw.reencode(data, target[0], target[1], _dct_denominator(w, h, size) if size else 1, quality,
                                    max_pixels)
        except ValueError as exc:
            raise Rejected(f"corrupt image: {exc}") from None
        if jpg is not None:
            return FixedImage(jpg, target[0], target[1], tuple(fixes + ["resized"] * (size is not None)))
    if size is not None and is_jpeg:
        drafted = im.draft(None, (int(size[0] * _DRAFT_GAP), int(size[1] * _DRAFT_GAP)))
        # `box` is the full picture in decoded pixels: the last row and column of a
        # scaled decode may be partly padding, and resizing them as picture would
        # stretch it (measured: 500x375 -> 1/2 -> 160 px lost 9 dB without it).
        box = drafted[1] if drafted else None
    _load(im)
    if turn:
        fixes.append("exif_orientation")
    im = _to_rgb(im, fixes)
    if size is not None:
        fixes.append("resized")
        im = im.resize(size, Image.Resampling.LANCZOS, box=box, reducing_gap=_RESIZE_GAP)
    if turn and orientation in _UPRIGHT:
        im = im.transpose(_UPRIGHT[orientation])
    out = io.BytesIO()
    im.save(out, "JPEG", quality=quality, progressive=False, optimize=False)
    return FixedImage(out.getvalue(), im.size[0], im.size[1], tuple(fixes))
