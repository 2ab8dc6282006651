"""Crop windows, chosen in Python so that every random draw comes from (seed, epoch, global step, slot).

The decoder then decodes only the window (`fn.decoders.image_slice`) and the resize
scales it to the stage size, which together are a random-resized-crop whose output
size can change between batches of one built pipeline.

- `random_resized_crop` follows torchvision's RandomResizedCrop: 10 tries of
  area fraction ~ U(scale) and log-aspect ~ U(log ratio), then a center fallback.
- `center_crop` gives the window that "resize the shorter side to S / crop_pct,
  then center-crop S" keeps, in source pixels.
"""
from __future__ import annotations

import math

import numpy as np

ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 windows before the fallback


def random_resized_crop(
    rng: np.random.Generator,
    sizes: np.ndarray,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    keep: slice | None = None,
    total: int | None = None,
) -> np.ndarray:
    """Windows [N, 4] float32 as (y, x, h, w) in source pixels, for sizes [N, 2] = (H, W).

    The draws are made for `total` slots (default N), one row each, and rows `keep` (default all)
    are used: `sizes` are those slots' images. Every step below is row-wise, so a slot's window
    depends on its own draws and size only, whichever other slots a rank holds.
    """
    n = len(sizes)
    total = n if total is None else total
    keep = slice(0, n) if keep is None else keep
    heights = sizes[:, 0:1].astype(np.float64)
    widths = sizes[:, 1:2].astype(np.float64)
    area = heights * widths
    target = area * rng.uniform(scale[0], scale[1], size=(total, ATTEMPTS))[keep]
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(total, ATTEMPTS))[keep])
    w = np.round(np.sqrt(target * aspect))
    h = np.round(np.sqrt(target / aspect))
    u_y = rng.random(size=(total, ATTEMPTS))[keep]
    u_x = rng.random(size=(total, ATTEMPTS))[keep]
    ok = (w > 0) & (w <= widths) & (h > 0) & (h <= heights)
    first = np.argmax(ok, axis=1)  # first valid attempt (0 when none is valid)
    rows = np.arange(n)
    ch, cw = h[rows, first], w[rows, first]
    y = np.floor(u_y[rows, first] * (heights[:, 0] - ch + 1))
    x = np.floor(u_x[rows, first] * (widths[:, 0] - cw + 1))
    # Fallback (no valid attempt): the whole image, clamped to the ratio range, centered.
    fb = ~ok.any(axis=1)
    if fb.any():
        hh, ww = heights[fb, 0], widths[fb, 0]
        in_ratio = ww / hh
        fh, fw = hh.copy(), ww.copy()
        narrow, wide = in_ratio < ratio[0], in_ratio > ratio[1]
        fh[narrow] = np.round(ww[narrow] / ratio[0])
        fw[wide] = np.round(hh[wide] * ratio[1])
        ch[fb], cw[fb] = fh, fw
        y[fb], x[fb] = np.floor((hh - fh) / 2), np.floor((ww - fw) / 2)
    return np.stack([y, x, ch, cw], axis=1).astype(np.float32)


def center_crop(sizes: np.ndarray, image_size: int, crop_pct: float) -> np.ndarray:
    """Windows [N, 4] (y, x, h, w): the square that resize-shorter-to-floor(S/crop_pct) + center-crop S keeps."""
    scale_size = math.floor(image_size / crop_pct)  # timm's eval transform: resize shorter side to this
    heights = sizes[:, 0].astype(np.float64)
    widths = sizes[:, 1].astype(np.float64)
    side = np.round(np.minimum(heights, widths) * image_size / scale_size)
    ch = np.clip(side, 1, heights)
    cw = np.clip(side, 1, widths)
    y = np.round((heights - ch) / 2)
    x = np.round((widths - cw) / 2)
    return np.stack([y, x, ch, cw], axis=1).astype(np.float32)


def center_region(sizes: np.ndarray, image_size: int, crop_pct: float) -> np.ndarray:
    """[N, 4] float64 (y0, x0, y1, x1) in source pixels: exactly the region torchvision's eval transform keeps.

    `Resize(floor(S / crop_pct))` scales the shorter side to R = floor(S / crop_pct) and the longer
    to int(R * long / short) (torchvision's rounding), then `CenterCrop(S)` starts at
    int(round((resized - S) / 2)) (Python's round); mapped back to the source, that is a region
    with fractional corners, which the resize takes as its ROI (same pixel-centre convention).
    """
    resized_short = math.floor(image_size / crop_pct)
    out = np.empty((len(sizes), 4), np.float64)
    for i, (h, w) in enumerate(sizes.tolist()):
        short, long = (h, w) if h <= w else (w, h)
        long_r = int(resized_short * long / short)
        hr, wr = (resized_short, long_r) if h <= w else (long_r, resized_short)
        top, left = int(round((hr - image_size) / 2.0)), int(round((wr - image_size) / 2.0))
        sy, sx = h / hr, w / wr
        out[i] = (top * sy, left * sx, (top + image_size) * sy, (left + image_size) * sx)
    return out


def with_margin(region: np.ndarray, sizes: np.ndarray, image_size: int) -> np.ndarray:
    """[N, 4] float32 (y, x, h, w): whole source pixels covering `region` plus the linear antialias filter's
    reach (one output pixel's source extent + 1 px per side), clipped to the image: what to decode so
    that the filter sees the same neighbours as a resize of the whole image."""
    reach = np.maximum((region[:, 2:4] - region[:, 0:2]) / image_size, 1.0) + 1.0  # (y, x) source px
    lo = np.maximum(np.floor(region[:, 0:2] - reach), 0)
    hi = np.minimum(np.ceil(region[:, 2:4] + reach), sizes[:, 0:2])
    return np.concatenate([lo, hi - lo], axis=1).astype(np.float32)
