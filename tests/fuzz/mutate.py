"""A JPEG-aware mutator: bit flips, truncations, header fields (sizes, sampling factors, component counts,
Huffman and quantization tables, scan headers), marker splices and repeated scans.

Light on imports (the fuzz child imports it under AddressSanitizer and keeps its memory small).
"""
from __future__ import annotations

import random
import struct

SOI, EOI, SOS, DHT, DQT, DRI = 0xD8, 0xD9, 0xDA, 0xC4, 0xDB, 0xDD
SOF = frozenset(range(0xC0, 0xD0)) - {DHT, 0xC8, 0xCC}
NO_LENGTH = frozenset({0x01, SOI, EOI, *range(0xD0, 0xD8)})  # TEM, SOI, EOI, RST0-7

# ---- JPEG structure ------------------------------------------------------------------------------------------

def segments(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, marker, end) of each marker segment in order; a scan's segment ends where its entropy-coded data
    does (the next marker other than RST or a stuffed 0xFF00). Stops at the first thing that is not a marker."""
    out, i, n = [], 2 if data[:2] == b"\xff\xd8" else 0, len(data)
    if i:
        out.append((0, SOI, 2))
    while i + 2 <= n and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker in NO_LENGTH:
            out.append((i, marker, i + 2))
            i += 2
            continue
        if i + 4 > n:
            break
        end = min(n, i + 2 + ((data[i + 2] << 8) | data[i + 3]))
        if marker == SOS:
            end = data.find(b"\xff", end)
            while 0 <= end < n - 1 and (data[end + 1] == 0x00 or 0xD0 <= data[end + 1] <= 0xD7):
                end = data.find(b"\xff", end + 2)
            end = n if end < 0 or end >= n - 1 else end
        out.append((i, marker, end))
        i = end
    return out


def set_frame_size(data: bytes, height: int, width: int) -> bytes:
    """data with its frame header claiming height x width px."""
    out = bytearray(data)
    for start, marker, _ in segments(data):
        if marker in SOF:
            out[start + 5 : start + 9] = struct.pack(">HH", height, width)
            break
    return bytes(out)


def repeat_scans(data: bytes, times: int) -> bytes:
    """data with its last scan (header and entropy-coded data) repeated to `times` copies."""
    scans = [(s, e) for s, m, e in segments(data) if m == SOS]
    s, e = scans[-1]
    return data[:e] + data[s:e] * (times - 1) + data[e:]


# ---- mutations -----------------------------------------------------------------------------------------------

INTERESTING_BYTES = (0x00, 0x01, 0x02, 0x03, 0x04, 0x07, 0x08, 0x0F, 0x10, 0x11, 0x12, 0x21, 0x22, 0x41, 0x44, 0x7F,
                     0x80, 0xC0, 0xC2, 0xD0, 0xD9, 0xDA, 0xFE, 0xFF)
INTERESTING_SIDES = (0, 1, 2, 7, 8, 9, 15, 16, 17, 31, 255, 256, 4095, 8191, 13000, 16384, 40000, 65500, 65535)


def _bit_flips(rng: random.Random, d: bytearray) -> None:
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(d))
        d[i] ^= 1 << rng.randrange(8)


def _byte_sets(rng: random.Random, d: bytearray) -> None:
    for _ in range(rng.randint(1, 4)):
        d[rng.randrange(len(d))] = rng.choice(INTERESTING_BYTES) if rng.random() < 0.7 else rng.randrange(256)


def _truncate(rng: random.Random, d: bytearray) -> None:
    if len(d) > 1:
        del d[rng.randrange(1, len(d)):]


def _header_field(rng: random.Random, d: bytearray) -> None:
    """A field of the frame header (size, component count, sampling factors, table selectors), a Huffman or
    quantization table, a scan header or the restart interval."""
    segs = [(s, m, e) for s, m, e in segments(bytes(d)) if m in SOF or m in (DHT, DQT, SOS, DRI)]
    if not segs:
        return _byte_sets(rng, d)
    s, m, e = rng.choice(segs)
    if m in SOF and e - s >= 10:
        field = rng.randrange(4)
        if field == 0:
            d[s + 5 : s + 9] = struct.pack(">HH", rng.choice(INTERESTING_SIDES), rng.choice(INTERESTING_SIDES))
        elif field == 1:
            d[s + 9] = rng.choice((0, 1, 2, 3, 4, 5, 255))  # component count
        elif field == 2 and e - s > 11:
            k = rng.randrange((e - s - 10) // 3 or 1)
            if s + 11 + 3 * k < e:
                d[s + 11 + 3 * k] = rng.choice((0x00, 0x11, 0x12, 0x14, 0x21, 0x22, 0x41, 0x44, 0x45, 0x88, 0xFF))
        else:
            d[s + 4] = rng.choice((0, 8, 12, 16, 255))  # sample precision
        return
    body = range(s + 4, e if m != SOS else min(e, s + 2 + ((d[s + 2] << 8) | d[s + 3])))
    if len(body):
        for _ in range(rng.randint(1, 3)):
            d[rng.choice(body)] = rng.choice(INTERESTING_BYTES) if rng.random() < 0.6 else rng.randrange(256)


def _splice(rng: random.Random, d: bytearray) -> None:
    """Delete, duplicate or move a marker segment, or bring one in from another seed."""
    segs = segments(bytes(d))
    if len(segs) < 2:
        return _truncate(rng, d)
    s, m, e = rng.choice(segs[1:])
    kind = rng.randrange(4)
    if kind == 0:
        del d[s:e]
    elif kind == 1:
        d[e:e] = d[s:e]
    elif kind == 2:
        piece = bytes(d[s:e])
        del d[s:e]
        at = rng.choice(segments(bytes(d)) or [(0, 0, 0)])[2]
        d[at:at] = piece
    else:
        other = rng.choice(SPLICE_FROM or [bytes(d)])
        os_, _, oe = rng.choice(segments(other)[1:] or [(0, 0, 0)])
        d[e:e] = other[os_:oe]


def _repeat_scans(rng: random.Random, d: bytearray) -> None:
    """The last scan again, a few times or past the scan limit (MAX_SCANS = 500)."""
    if any(m == SOS for _, m, _ in segments(bytes(d))):
        d[:] = repeat_scans(bytes(d), rng.choice((2, 2, 3, 3, 10, 10, 499, 501)))


def _scan_noise(rng: random.Random, d: bytearray) -> None:
    """Markers, fill bytes or random bytes inside the entropy-coded data."""
    scans = [(s, e) for s, m, e in segments(bytes(d)) if m == SOS]
    if not scans:
        return _bit_flips(rng, d)
    s, e = rng.choice(scans)
    at = rng.randrange(s + 2, max(s + 3, e))
    d[at:at] = rng.choice((b"\xff\xd0", b"\xff\xd7", b"\xff\xd9", b"\xff\xff\xff", b"\xff\x00" * 8,
                           bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))))


SPLICE_FROM: list[bytes] = []  # the seeds, whose segments _splice brings in: set by the caller

MUTATIONS = (_bit_flips, _byte_sets, _truncate, _header_field, _header_field, _splice, _repeat_scans, _scan_noise)


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One to three of the mutations above, stacked."""
    d = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        if not d:
            break
        rng.choice(MUTATIONS)(rng, d)
    return bytes(d)
