"""Writing one shard: a deterministic POSIX tar plus its DALI `wds2idx` index.

Tar headers carry fixed metadata (mtime 0, uid/gid 0, mode 0444), so the same
samples in the same order give the same bytes on any machine; resumed and
distributed builds rely on this.
"""
from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass

from shards.schema import Sample

INDEX_VERSION = "v1.2"  # the version DALI's wds2idx writes
_BLOCK = 512  # tar block size, bytes


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


class ShardWriter:
    """Writes samples to a local file; `close()` returns size, checksum and index."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = open(path, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._entries: list[list[tuple[str, int, int, str]]] = []
        self._keys: set[str] = set()

    def write(self, sample: Sample) -> None:
        if sample.key in self._keys:
            raise ValueError(f"duplicate key {sample.key!r} in shard {self.path}")
        self._keys.add(sample.key)
        members = []
        for ext, payload in sample.members():
            name = f"{sample.key}.{ext}"
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            info.mtime = 0
            info.mode = 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            header_at = self._tar.offset
            self._tar.addfile(info, io.BytesIO(payload))
            members.append((ext, header_at + _BLOCK, len(payload), name))  # names < 100 chars: one header block
        self._entries.append(members)

    def close(self) -> WrittenShard:
        self._tar.close()
        self._file.close()
        digest = hashlib.sha256()
        size = 0
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
                size += len(block)
        return WrittenShard(len(self._entries), size, digest.hexdigest(), build_index(self._entries))

    def abort(self) -> None:
        self._tar.close()
        self._file.close()
