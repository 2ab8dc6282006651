"""Structural check of one shard: checksum, tar layout, sample members, index.

`pipeline verify-shards` adds what needs an image decoder; everything that
depends on how a shard is laid out lives here.
"""
from __future__ import annotations

import hashlib
import tarfile
from collections import Counter
from dataclasses import dataclass, field

from stagewise.shards.schema import MEMBERS, Sample, SampleError, sample_from_members
from stagewise.shards.store import open_url
from stagewise.shards.writer import build_index


class _HashingReader:
    """A read-only stream that hashes what passes through it."""

    def __init__(self, raw) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()
        self.bytes = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


@dataclass
class ShardScan:
    sha256: str = ""
    bytes: int = 0
    samples: list[Sample] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    index: str = ""  # the index this shard's bytes imply


def scan_shard(url: str) -> ShardScan:
    scan = ShardScan()
    entries: list[list[tuple[str, int, int, str]]] = []
    members: dict[str, bytes] = {}
    key: str | None = None
    seen: set[str] = set()

    def flush() -> None:
        if key is None:
            return
        extra = sorted(set(members) - set(MEMBERS))
        if extra:
            scan.problems.append(f"sample {key!r} has unexpected member(s) {extra}")
        try:
            scan.samples.append(sample_from_members(key, members))
        except SampleError as exc:
            scan.problems.append(str(exc))

    with open_url(url, "rb") as raw:
        stream = _HashingReader(raw)
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[arg-type]
                for info in tar:
                    if not info.isfile():
                        scan.problems.append(f"member {info.name!r} is not a regular file")
                        continue
                    k, dot, ext = info.name.partition(".")
                    if not dot or "/" in info.name:
                        scan.problems.append(f"member {info.name!r} is not named <key>.<ext>")
                        continue
                    data = tar.extractfile(info).read()  # type: ignore[union-attr]
                    if k != key:
                        flush()
                        if k in seen:
                            scan.problems.append(f"key {k!r} appears in two places (members not contiguous)")
                        seen.add(k)
                        key, members = k, {}
                        entries.append([])
                    members[ext] = data
                    entries[-1].append((ext, info.offset_data, info.size, info.name))
            flush()
            stream.drain()  # hash the end-of-archive padding too
        except (tarfile.TarError, EOFError, OSError) as exc:
            scan.problems.append(f"not a readable tar: {exc}")
    scan.sha256, scan.bytes = stream.sha.hexdigest(), stream.bytes
    scan.index = build_index(entries)
    return scan


def class_histogram(samples: list[Sample]) -> Counter[int]:
    return Counter(s.label for s in samples)
