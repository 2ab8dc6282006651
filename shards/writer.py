"""Writing one shard: a deterministic POSIX tar plus its DALI `wds2idx` index.

Tar headers carry fixed metadata (mtime 0, uid/gid 0, mode 0444), so the same
samples in the same order give the same bytes on any machine; resumed and
distributed builds rely on this. The headers are built here rather than by
`tarfile` (whose per-member object copies cost more than copying a JPEG), with
the same bytes `tarfile.open(format=USTAR_FORMAT)` writes; the checksum is
computed as the bytes go out, so closing does not read the shard back.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from stagewise.shards.schema import Sample

INDEX_VERSION = "v1.2"  # the version DALI's wds2idx writes
_BLOCK = 512  # tar block size, bytes
_RECORD = 20 * _BLOCK  # tar files end on a record boundary (tarfile's RECORDSIZE)
_NAME_MAX = 100  # bytes of a ustar name field; longer names would need the prefix field


@dataclass(frozen=True)
class WrittenShard:
    num_samples: int
    bytes: int
    sha256: str
    index: str  # the .idx file's text


def build_index(entries: list[list[tuple[str, int, int, str]]]) -> str:
    """Index text in wds2idx's format.

    First line `v1.2 <samples>`, then one line per sample listing each member as
    `<ext> <data offset> <size> <member name>`, offsets in bytes from the start
    of the tar (past the member's 512-byte header).
    """
    lines = [f"{INDEX_VERSION} {len(entries)}"]
    for members in entries:
        lines.append(" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in members))
    return "\n".join(lines) + "\n"


def _octal(value: int, width: int) -> bytes:
    """A ustar number field: zero-padded octal digits and a NUL."""
    return b"%0*o\0" % (width - 1, value)


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte header of a regular file with our fixed metadata (POSIX.1-1988 ustar layout)."""
    raw = name.encode("utf-8")
    if len(raw) > _NAME_MAX:
        raise ValueError(f"member name {name!r} is longer than {_NAME_MAX} bytes")
    if size >= 8**11:  # 11 octal digits: 8 GiB
        raise ValueError(f"member {name!r} of {size} bytes is too large for a ustar header")
    head = (raw.ljust(100, b"\0") + _octal(0o444, 8) + _octal(0, 8) + _octal(0, 8)  # name, mode, uid, gid
            + _octal(size, 12) + _octal(0, 12))  # size, mtime
    # type "regular file", then magic and version; link name, user/group names, device numbers and prefix stay NUL
    tail = (b"0" + b"\0" * 100 + b"ustar\x0000").ljust(_BLOCK - len(head) - 8, b"\0")
    checksum = sum(head) + sum(tail) + 8 * ord(" ")  # computed with the checksum field itself as 8 spaces
    return head + b"%06o\0 " % checksum + tail


class ShardWriter:
    """Writes samples to a local file; `close()` returns size, checksum and index."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = open(path, "wb")
        self._digest = hashlib.sha256()
        self._offset = 0
        self._entries: list[list[tuple[str, int, int, str]]] = []
        self._keys: set[str] = set()

    def _put(self, data: bytes) -> None:
        self._file.write(data)
        self._digest.update(data)
        self._offset += len(data)

    def write(self, sample: Sample) -> None:
        if sample.key in self._keys:
            raise ValueError(f"duplicate key {sample.key!r} in shard {self.path}")
        self._keys.add(sample.key)
        members = []
        for ext, payload in sample.members():
            name = f"{sample.key}.{ext}"
            self._put(ustar_header(name, len(payload)))
            members.append((ext, self._offset, len(payload), name))
            self._put(payload)
            self._put(b"\0" * (-len(payload) % _BLOCK))
        self._entries.append(members)

    def close(self) -> WrittenShard:
        self._put(b"\0" * (2 * _BLOCK))  # end-of-archive marker
        self._put(b"\0" * (-self._offset % _RECORD))
        self._file.close()
        return WrittenShard(len(self._entries), self._offset, self._digest.hexdigest(), build_index(self._entries))

    def abort(self) -> None:
        self._file.close()
