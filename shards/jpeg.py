"""The one JPEG header reader: a JPEG's frame header (SOFn) gives its coding process and its size without a decode.

The builder uses the marker (a baseline frame is copied as it is; progressive
and other frames are re-encoded), verify-shards checks it, and the loader takes
each sample's size from it to choose crop windows and to refuse oversized
images before DALI sees them.
"""
from __future__ import annotations

from dataclasses import dataclass

from stagewise.shards.schema import SampleError

# Pixel limit (height x width) above which an image is refused as a decompression bomb: Pillow's
# own default (about 0.25 GB of RGB pixels). build-shards' --max-pixels and the loader's
# ReadSpec.max_pixels both default to it and mean the same: refuse when h * w > limit.
DEFAULT_MAX_PIXELS = 89_478_485
SOF_BASELINE = 0xC0  # baseline DCT, the only frame a shard's jpg member may have
SOF_PROGRESSIVE = (0xC2, 0xC6, 0xCA, 0xCE)
# Start-of-frame markers SOF0..SOF15, less DHT (C4), JPG (C8) and DAC (CC), which share the range.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_NO_LENGTH = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RST0-7, SOI: markers without a length field
_START_OF_SCAN = 0xDA


class JpegHeaderError(SampleError):
    """Bytes that are not a JPEG with a frame header; the message says what was found instead."""


@dataclass(frozen=True)
class FrameHeader:
    marker: int  # 0xC0 baseline, 0xC2 progressive, ...
    height: int  # px
    width: int  # px

    @property
    def pixels(self) -> int:
        return self.height * self.width


def read_frame_header(data: bytes | memoryview) -> FrameHeader:
    """The first frame header of `data`: walks the marker segments from SOI, reads nothing past the header."""
    if len(data) < 2 or data[0] != 0xFF or data[1] != 0xD8:
        raise JpegHeaderError("jpg member is not a JPEG (no SOI marker)")
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise JpegHeaderError(f"jpg member: bad marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _NO_LENGTH:
            i += 2
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        if marker in _SOF and i + 9 <= n:
            height = (data[i + 5] << 8) | data[i + 6]
            width = (data[i + 7] << 8) | data[i + 8]
            if height == 0 or width == 0:
                raise JpegHeaderError(f"jpg member: frame header gives size {height}x{width}")
            return FrameHeader(marker, height, width)
        if marker == _START_OF_SCAN or length < 2:  # a scan before any frame header
            break
        i += 2 + length
    raise JpegHeaderError("jpg member: no JPEG frame header found (truncated or not baseline/progressive)")


def frame_marker(data: bytes) -> int | None:
    """The frame header's marker, or None when `data` has no readable frame header."""
    try:
        return read_frame_header(data).marker
    except JpegHeaderError:
        return None
