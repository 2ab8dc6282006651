"""The tar side of a shard: the ustar headers we write, and the members read back grouped by sample.

Tar headers carry fixed metadata (mtime 0, uid/gid 0, mode 0444), so the same
samples in the same order give the same bytes on any machine; resumed and
distributed builds rely on this. The headers are built here rather than by
`tarfile` (whose per-member object copies cost more than copying a JPEG), with
the same bytes `tarfile.open(format=USTAR_FORMAT)` writes.

A member `<key>.<ext>` belongs to sample `<key>` (split at the first dot of the
base name, as webdataset does); a sample's members are contiguous.
"""
from __future__ import annotations

import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, TypeVar

BLOCK = 512  # tar block size, bytes
RECORD = 20 * BLOCK  # tar files end on a record boundary (tarfile's RECORDSIZE)
_NAME_MAX = 100  # bytes of a ustar name field; longer names would need the prefix field

T = TypeVar("T")


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
    tail = (b"0" + b"\0" * 100 + b"ustar\x0000").ljust(BLOCK - len(head) - 8, b"\0")
    checksum = sum(head) + sum(tail) + 8 * ord(" ")  # computed with the checksum field itself as 8 spaces
    return head + b"%06o\0 " % checksum + tail


@dataclass(frozen=True)
class TarMember:
    name: str
    offset: int  # of the data, in bytes from the start of the tar
    data: bytes | None  # None: not a regular file (a directory, a link, ...)


def iter_tar(fileobj: IO[bytes]) -> Iterator[TarMember]:
    """Every member of a tar stream, in order, read sequentially (no seeks: works on any stream)."""
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for info in tar:
            data = tar.extractfile(info).read() if info.isfile() else None  # type: ignore[union-attr]
            yield TarMember(info.name, info.offset_data, data)


def split_member_name(name: str) -> tuple[str, str] | None:
    """(sample key, extension) of `<key>.<ext>` (a folder prefix stays in the key); None for other names."""
    base = name.rsplit("/", 1)[-1]
    if "." not in base or base.startswith("."):
        return None
    key, ext = base.split(".", 1)
    return name[: len(name) - len(base)] + key, ext


def group_by_key(items: Iterable[tuple[str, T]]) -> Iterator[tuple[str, list[T]]]:
    """(key, its items) for each run of consecutive items with the same key."""
    key: str | None = None
    run: list[T] = []
    for k, item in items:
        if k != key:
            if key is not None:
                yield key, run
            key, run = k, []
        run.append(item)
    if key is not None:
        yield key, run
