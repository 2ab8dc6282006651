"""Re-encoding in YCbCr planes (pipeline/_jpegraw.c) against Pillow's RGB path.

Same geometry, no worse pictures, and the same accept/reject decisions: the C
path hands back None for whatever it does not take, and Pillow decides.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from stagewise.pipeline import imagefix
from stagewise.pipeline.imagefix import Rejected, normalize_image
from stagewise.benchmarks.datasets import mosaic, photo
from tests.fuzz.campaign import extensions_should_build

jpegraw = imagefix._jpegraw
# Skipped only where the extension cannot build (no C compiler or libjpeg headers); where it can, a missing
# build fails these tests instead of hiding them.
built = pytest.mark.skipif(jpegraw is None and not extensions_should_build(),
                           reason="no C compiler or libjpeg headers: pipeline/_jpegraw.c cannot build here")


def _jpeg(im: Image.Image, quality: int = 92, **save: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality, **save)
    return buf.getvalue()


def _psnr(jpg: bytes, ref: np.ndarray, luma: bool) -> float:
    with Image.open(io.BytesIO(jpg)) as im:
        got = np.asarray(im.convert("RGB"), np.float64)
    d = got - ref
    if luma:  # BT.601 weights, as JPEG's Y
        d = d @ np.array([0.299, 0.587, 0.114])
    return float(10 * np.log10(255**2 / max(np.mean(d * d), 1e-12)))


@built
def test_the_extension_is_built_where_it_can_be():
    assert jpegraw is not None, "pipeline/_jpegraw.c did not build, though a compiler and libjpeg's headers are here"


# (source size, Pillow save options, --max-side, DCT scale the rule picks)
CASES = {
    "4:2:0 to 320": ((500, 375), {}, 320, 1),
    "odd size, 1/2 decode": ((999, 749), {}, 150, 2),
    "1/4 decode": ((1000, 750), {}, 100, 4),
    "1/8 decode": ((1200, 800), {}, 75, 8),
    "4:4:4 source": ((640, 420), {"subsampling": 0}, 300, 1),
    "4:2:2 source": ((641, 421), {"subsampling": 1}, 150, 2),
    "progressive, fits": ((500, 375), {"progressive": True}, None, 1),
    "progressive, resized": ((1000, 750), {"progressive": True}, 333, 1),
}


@built
@pytest.mark.parametrize("name", CASES)
def test_planar_matches_pillow_geometry_and_is_no_worse(name):
    size, save, max_side, denom = CASES[name]
    data = _jpeg(mosaic(size, seed=len(name)), **save)
    planar = normalize_image(data, max_side=max_side, quality=90)
    pillow = normalize_image(data, max_side=max_side, quality=90, planar=False)
    assert (planar.width, planar.height, planar.fixes) == (pillow.width, pillow.height, pillow.fixes)
    if max_side is not None:
        assert imagefix._dct_denominator(*size, (planar.width, planar.height)) == denom
    assert planar.jpg != pillow.jpg  # the C path ran: rounding differs
    with Image.open(io.BytesIO(planar.jpg)) as out:
        assert (out.format, out.mode, out.size) == ("JPEG", "RGB", (planar.width, planar.height))
        assert "progressive" not in out.info and [c[1:3] for c in out.layer] == [(2, 2), (1, 1), (1, 1)]
    with Image.open(io.BytesIO(data)) as src:  # the reference: Lanczos from the full RGB decode, no JPEG
        ref = np.asarray(src.convert("RGB").resize((planar.width, planar.height), Image.Resampling.LANCZOS),
                         np.float64)
    # measured: luma within 0.1 dB of Pillow's path, colour 0.3-1 dB closer (chroma is
    # resized once, not upsampled, resized and downsampled again)
    assert _psnr(planar.jpg, ref, luma=True) > _psnr(pillow.jpg, ref, luma=True) - 0.2
    assert _psnr(planar.jpg, ref, luma=False) > _psnr(pillow.jpg, ref, luma=False) - 0.1


@built
def test_avx2_and_plain_c_kernels_give_the_same_bytes():
    data = _jpeg(mosaic((999, 749), seed=1))
    sizes = [(320, 240), (7, 5), (998, 748), (150, 113), (33, 600)]
    simd = [jpegraw.reencode(data, w, h, 1, 90) for w, h in sizes]
    before = jpegraw.use_avx2(False)
    try:
        plain = [jpegraw.reencode(data, w, h, 1, 90) for w, h in sizes]
    finally:
        jpegraw.use_avx2(before)
    assert all(x is not None for x in simd) and simd == plain


@built
def test_cached_taps_never_leak_between_sizes():
    """More sizes than the per-thread tap cache holds, then the first again."""
    data = _jpeg(photo(2, (400, 300)))
    first = jpegraw.reencode(data, 200, 150, 1, 90)
    others = [jpegraw.reencode(data, 100 + 9 * k, 75 + 7 * k, 1, 90) for k in range(12)]
    assert len(set(others)) == 12 and jpegraw.reencode(data, 200, 150, 1, 90) == first


def _cmyk() -> bytes:
    return _jpeg(photo(3).convert("CMYK"))


def _png() -> bytes:
    buf = io.BytesIO()
    photo(4).save(buf, "PNG")
    return buf.getvalue()


def _corrupt_scan() -> bytes:
    data = bytearray(_jpeg(photo(5, (300, 200))))
    for i in range(len(data) // 2, len(data) // 2 + 40, 4):
        data[i] ^= 0x5A
    return bytes(data)


NOT_TAKEN = {
    "grayscale JPEG": lambda: _jpeg(photo(1).convert("L")),
    "CMYK JPEG": _cmyk,
    "PNG": _png,
    "truncated": lambda: _jpeg(photo(6, (300, 200)))[:3000],
    "truncated progressive": lambda: _jpeg(photo(6, (300, 200)), progressive=True)[:3000],
    "corrupt scan": _corrupt_scan,
    "empty": lambda: b"",
}


@built
@pytest.mark.parametrize("name", NOT_TAKEN)
def test_what_the_c_path_does_not_take_goes_to_pillow_with_the_same_outcome(name):
    data = NOT_TAKEN[name]()
    assert jpegraw.reencode(data, 40, 30, 1, 90) is None

    def outcome(planar: bool):
        try:
            img = normalize_image(data, max_side=40, quality=90, planar=planar)
        except Rejected as exc:
            return "rejected", str(exc)
        return img.jpg, img.fixes

    assert outcome(True) == outcome(False)


@built
@pytest.mark.parametrize("args", [(0, 10, 1, 90), (10, 10, 3, 90), (10, 10, 1, 0), (10, 10, 1, 101),
                                  (65501, 10, 1, 90), (2**31 - 1, 2**31 - 1, 1, 90), (10, -3, 1, 90),
                                  (20000, 20000, 1, 90), (10, 10, 1, 90, 99), (10, 10, 1, 90, -1)])
def test_bad_arguments_raise_naming_the_values(args):
    """Checked in C, whatever Python passed: sizes 1..65500 a side that fit the pixel ceiling (or the caller's
    lower max_pixels, the fifth argument), not only the ones imagefix computes."""
    pixels = args[4] if len(args) > 4 else 0
    with pytest.raises(ValueError, match=f"{args[0]}x{args[1]}, denom {args[2]}, quality {args[3]} or "
                                         f"max_pixels {pixels}"):
        jpegraw.reencode(_jpeg(photo(0)), *args)


@built
def test_output_does_not_depend_on_what_was_re_encoded_before():
    """Shards must be byte-identical whatever order a worker meets its inputs in (resume, other worker
    counts, Ray). Two heights and many widths: the column taps hit the per-thread cache while the row
    taps miss and evict, in every order (a hit slot once got evicted while still in use)."""
    rng = np.random.default_rng(5)
    inputs = [_jpeg(photo(k, (int(rng.integers(150, 350)), (360, 400)[k % 2]))) for k in range(40)]

    def outputs(order: list[int]) -> dict[int, bytes]:
        return {k: normalize_image(inputs[k], max_side=100, quality=90).jpg for k in order}

    first = outputs(list(range(40)))
    for seed in (1, 2, 3):
        order = [int(k) for k in np.random.default_rng(seed).permutation(40)]
        again = outputs(order)
        assert [k for k in first if again[k] != first[k]] == [], f"order {order[:8]}... changed these outputs"
