"""Seed JPEGs of every kind the two C decoders handle, and hostile variants of them (tests/fuzz/mutate.py
makes the rest).

Seeds are made from the photos the venv ships (`benchmarks.datasets.photo`: scikit-learn's sample photos),
small (<= 64 px a side, apart from one mosaic) so that a sanitizer build decodes thousands a second.
Everything here is deterministic: a case is a function of (seed, index), so a campaign can be replayed.
"""
from __future__ import annotations

import functools
import io
import struct
from pathlib import Path

from PIL import Image

from stagewise.benchmarks.datasets import mosaic, photo
from tests.fuzz.mutate import DHT, SOF, segments, repeat_scans, set_frame_size


def _save(img: Image.Image, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **{"quality": 85, **options})
    return buf.getvalue()


@functools.lru_cache(maxsize=1)
def seeds() -> dict[str, bytes]:
    """name -> JPEG: baseline and progressive, 4:4:4 / 4:2:2 / 4:2:0, restart markers, optimised Huffman
    tables, grey, CMYK, odd sizes, 1 px sides, a DCT-scalable size."""
    p = photo(1, (48, 40))
    return {
        "baseline 4:2:0": _save(p),
        "baseline 4:4:4": _save(p, subsampling=0),
        "baseline 4:2:2": _save(p, subsampling=1),
        "progressive 4:2:0": _save(p, progressive=True),
        "progressive 4:4:4": _save(p, progressive=True, subsampling=0),
        "progressive grey": _save(p.convert("L"), progressive=True),
        "restart markers": _save(p, restart_marker_blocks=1),
        "restart markers, progressive": _save(p, restart_marker_rows=1, progressive=True),
        "optimised tables": _save(p, optimize=True),
        "grey": _save(p.convert("L")),
        "CMYK": _save(p.convert("CMYK")),
        "odd size 33x17": _save(photo(2, (33, 17))),
        "odd size 17x33 4:4:4": _save(photo(3, (17, 33)), subsampling=0),
        "1x1": _save(photo(4, (1, 1))),
        "1x50": _save(photo(5, (1, 50))),
        "50x1 progressive": _save(photo(6, (50, 1)), progressive=True),
        "quality 100": _save(photo(7, (24, 24)), quality=100),
        "mosaic 128x96": _save(mosaic((128, 96), 8)),
    }


def _segment(marker: int, body: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(body) + 2) + body


def many_scans(components: int = 1) -> bytes:
    """An 8x8 progressive JPEG (grey, or YCbCr with 3 components) whose every scan is valid: per component the
    DC scan, then each of the 63 AC coefficients in its own first scan (Al = 13) and its 13 refinement scans:
    883 scans a component. libjpeg decodes it without a warning, so only the scan limit stops it (repeating one
    scan does not do: libjpeg warns of a bogus progression, and a warning already stops both decoders)."""
    ones = b"\x01" * 64
    frame = struct.pack(">BHHB", 8, 8, 8, components) + b"".join(bytes((c + 1, 0x11, 0)) for c in range(components))
    head = (b"\xff\xd8" + _segment(0xDB, b"\x00" + ones) + _segment(0xC2, frame)  # SOF2, 1x1 sampling
            + _segment(0xC4, b"\x00" + b"\x01" + b"\x00" * 15 + b"\x00")  # DC table 0: one 1-bit code, size 0
            + _segment(0xC4, b"\x10" + b"\x01" + b"\x00" * 15 + b"\x00"))  # AC table 0: one 1-bit code, EOB

    def scan(c: int, ss: int, se: int, ah: int, al: int) -> bytes:  # one block: a 0 bit (the code, or a correction)
        return _segment(0xDA, bytes((1, c + 1, 0x00, ss, se, ah << 4 | al))) + b"\x7f"

    scans = [scan(c, 0, 0, 0, 0) for c in range(components)]
    for c in range(components):
        for k in range(1, 64):
            scans += [scan(c, k, k, 0, 13)] + [scan(c, k, k, a, a - 1) for a in range(13, 0, -1)]
    return head + b"".join(scans) + b"\xff\xd9"


def hostile() -> dict[str, bytes]:
    """The nastiest cases, named: headers over the pixel ceiling, too many scans, truncated scans, tables and
    sampling factors libjpeg must refuse. Each decodes in neither C decoder, quickly and in bounded memory."""
    s = seeds()
    prog = s["progressive 4:2:0"]
    sof = next(start for start, m, _ in segments(prog) if m in SOF)
    bad_sampling = bytearray(s["baseline 4:2:0"])
    sof0 = next(start for start, m, _ in segments(bytes(bad_sampling)) if m in SOF)
    bad_sampling[sof0 + 11] = 0x55  # luma 5x5: libjpeg allows 1..4
    dht = next(start for start, m, _ in segments(s["baseline 4:2:0"]) if m == DHT)
    bad_huffman = bytearray(s["baseline 4:2:0"])
    bad_huffman[dht + 5 : dht + 21] = b"\xff" * 16  # code counts that overflow the code space
    scan = s["baseline 4:2:0"].find(b"\xff\xda")
    return {
        "progressive 40000x40000 header": set_frame_size(prog, 40000, 40000),
        "baseline 65535x65535 header": set_frame_size(s["baseline 4:2:0"], 65535, 65535),
        "progressive 13000x13000 header, truncated": set_frame_size(prog, 13000, 13000)[: len(prog) // 2],
        "883 valid progressive scans": many_scans(),
        "2649 valid progressive scans, YCbCr": many_scans(3),
        "600 copies of a scan": repeat_scans(prog, 600),
        "progressive, scans cut off": prog[: sof + (len(prog) - sof) // 3],
        "baseline, scan cut off": s["baseline 4:2:0"][: scan + 40],
        "sampling factors 5x5": bytes(bad_sampling),
        "Huffman table overflowing": bytes(bad_huffman),
        "zero-size frame": set_frame_size(s["baseline 4:2:0"], 0, 0),
        "CMYK, cut off": s["CMYK"][: len(s["CMYK"]) * 2 // 3],
        "headers only": s["baseline 4:2:0"][:scan] + b"\xff\xd9",
    }


def write_corpus(dest: Path) -> Path:
    """The seeds and the hostile cases as files, dest/seeds/*.jpg and dest/hostile/*.jpg (for the fuzz child,
    which does not import the photo generator's dependencies)."""
    for kind, cases in (("seeds", seeds()), ("hostile", hostile())):
        (dest / kind).mkdir(parents=True, exist_ok=True)
        for name, data in cases.items():
            path = dest / kind / (name.replace(" ", "_").replace(",", "").replace(":", "") + ".jpg")
            if not path.exists() or path.read_bytes() != data:
                path.write_bytes(data)
    return dest
