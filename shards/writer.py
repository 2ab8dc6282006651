"""Writing one shard: a deterministic POSIX tar (see `shards.tar`) plus its index (`shards.index`).

The checksum is computed as the bytes go out, so closing does not read the shard back.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from stagewise.shards.index import Member, build_index
from stagewise.shards.schema import Sample
from stagewise.shards.tar import BLOCK, RECORD, ustar_header


@dataclass(frozen=True)
class WrittenShard:
    num_samples: int
    bytes: int
    sha256: str
    index: str  # the .idx file's text


class ShardWriter:
    """Writes samples to a local file; `close()` returns size, checksum and index."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = open(path, "wb")
        self._digest = hashlib.sha256()
        self._offset = 0
        self._entries: list[list[Member]] = []
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
            self._put(b"\0" * (-len(payload) % BLOCK))
        self._entries.append(members)

    def close(self) -> WrittenShard:
        self._put(b"\0" * (2 * BLOCK))  # end-of-archive marker
        self._put(b"\0" * (-self._offset % RECORD))
        self._file.close()
        return WrittenShard(len(self._entries), self._offset, self._digest.hexdigest(), build_index(self._entries))

    def abort(self) -> None:
        self._file.close()
