"""Crop, decode and resize on the host: the first step of the CPU graph, in C threads.

In DALI's CPU mode the crop's resize costs as much as the decode (docs/benchmarks.md), so
with `EngineSpec.host_decode` (the CPU default when `loaders/_cropdecode.c` is built) each
batch is cropped, decoded and resized by `_cropdecode.decode_batch` in a few threads
without the GIL, and the DALI graph starts from uint8 images at the stage size.

The region of each sample is the same random-resized-crop window (or eval crop) the DALI
path decodes, drawn from the same generators (loaders/feed.py); the pixels differ from
DALI's decoder and resize by rounding (antialiased bilinear either way; within one grey
level of Pillow's crop-then-resize, tests/test_hostdecode.py).
"""
from __future__ import annotations

import io
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

try:
    from stagewise.loaders import _cropdecode
except ImportError:  # built at install where a C compiler and libjpeg's headers are; else DALI decodes
    _cropdecode = None

AVAILABLE = _cropdecode is not None


class Decoding:
    """One batch being decoded: its output array and the futures of its parts."""

    def __init__(self, out: np.ndarray, parts: list[Future], jpgs: list, regions: np.ndarray) -> None:
        self.out, self.parts, self.jpgs, self.regions = out, parts, jpgs, regions

    def done(self) -> bool:
        return all(part.done() for part in self.parts)

    def result(self) -> tuple[np.ndarray, dict[int, str]]:
        """(images [N, S, S, 3] uint8, {index: reason} of the samples that could not be decoded)."""
        failed: dict[int, str] = {}
        for part in self.parts:
            for i, message, unsupported in part.result():
                reason = _pil_crop(self.jpgs[i], self.regions[i], self.out[i]) if unsupported else None
                if reason is not None or not unsupported:
                    failed[i] = f"cannot decode the JPEG ({reason or message}; its header was readable)"
        return self.out, failed


class HostDecoder:
    """A small thread pool that crop-decode-resizes batches, each split into one part per thread."""

    def __init__(self, threads: int, max_pixels: int | None = None) -> None:
        """max_pixels: refuse frames over this many pixels; the C's own ceiling (`_cropdecode.MAX_PIXELS`) holds
        whatever it is, None included."""
        assert AVAILABLE, "stagewise.loaders._cropdecode is not built"
        self.threads = threads
        self.max_pixels = max_pixels or 0  # 0: the C ceiling alone
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="crop-decode")
        self.cpu_s = 0.0  # CPU seconds of the decoding threads so far (bench-loader's accounting)
        self._lock = threading.Lock()

    def submit(self, jpgs: list, regions: np.ndarray, size: int) -> Decoding:
        """Start decoding: jpgs (buffers), regions float64 [N, 8]: (y0, x0, y1, x1) to resize, x1 < x0 mirrors,
        then (top, left, bottom, right), what the filter may read (`feed._host_regions`)."""
        n = len(jpgs)
        regions = np.ascontiguousarray(regions, np.float64)
        out = np.empty((n, size, size, 3), np.uint8)
        cuts = np.linspace(0, n, min(self.threads, n) + 1).astype(int).tolist()
        parts = [self.pool.submit(self._part, jpgs, regions, out, a, b) for a, b in zip(cuts, cuts[1:]) if b > a]
        return Decoding(out, parts, jpgs, regions)

    def _part(self, jpgs: list, regions: np.ndarray, out: np.ndarray, start: int, stop: int) -> list:
        cpu = time.thread_time()
        failed = _cropdecode.decode_batch(jpgs, regions, out, start, stop, self.max_pixels)
        with self._lock:
            self.cpu_s += time.thread_time() - cpu
        return failed

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _pil_crop(data, region: np.ndarray, out: np.ndarray) -> str | None:
    """A JPEG the C decoder does not take (CMYK, 12-bit) through Pillow into `out`; the reason when it fails too."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            rgb = im.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - any decoder error is the sample's fault, reported by the caller
        return f"{type(exc).__name__}: {exc}"
    y0, x0, y1, x1, top, left, bottom, right = (float(v) for v in region)
    bounds = tuple(int(round(v)) for v in (left, top, right, bottom))
    box = (min(x0, x1) - bounds[0], y0 - bounds[1], max(x0, x1) - bounds[0], y1 - bounds[1])
    img = np.asarray(rgb.crop(bounds).resize(out.shape[1::-1], Image.BILINEAR, box=box))
    out[...] = img[:, ::-1] if x1 < x0 else img
    return None
