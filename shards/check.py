"""Structural check of one shard: checksum, tar layout, sample members, index.

`pipeline verify-shards` adds what needs an image decoder; everything that
depends on how a shard is laid out lives here.
"""
from __future__ import annotations

import hashlib
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from stagewise.shards.index import Member, build_index
from stagewise.shards.schema import MEMBERS, Sample, SampleError, sample_from_members
from stagewise.shards.store import open_url
from stagewise.shards.tar import TarMember, group_by_key, iter_tar, split_member_name


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
    entries: list[list[Member]] = []

    def named(stream) -> Iterator[tuple[str, tuple[str, TarMember]]]:
        """(key, (ext, member)) of every well-named regular file, in tar order; the rest become problems."""
        for m in iter_tar(stream):
            kx = split_member_name(m.name)
            if m.data is None:
                scan.problems.append(f"member {m.name!r} is not a regular file")
            elif kx is None or "/" in m.name:
                scan.problems.append(f"member {m.name!r} is not named <key>.<ext>")
            else:
                yield kx[0], (kx[1], m)

    with open_url(url, "rb") as raw:
        stream = _HashingReader(raw)
        try:
            seen: set[str] = set()
            for key, group in group_by_key(named(stream)):
                if key in seen:
                    scan.problems.append(f"key {key!r} appears in two places (members not contiguous)")
                seen.add(key)
                entries.append([(ext, m.offset, len(m.data), m.name) for ext, m in group])
                extra = sorted({ext for ext, _ in group} - set(MEMBERS))
                if extra:
                    scan.problems.append(f"sample {key!r} has unexpected member(s) {extra}")
                try:
                    scan.samples.append(sample_from_members(key, {ext: m.data for ext, m in group}))
                except SampleError as exc:
                    scan.problems.append(str(exc))
            stream.drain()  # hash the end-of-archive padding too
        except (tarfile.TarError, EOFError, OSError) as exc:
            scan.problems.append(f"not a readable tar: {exc}")
    scan.sha256, scan.bytes = stream.sha.hexdigest(), stream.bytes
    scan.index = build_index(entries)
    return scan


def class_histogram(samples: list[Sample]) -> Counter[int]:
    return Counter(s.label for s in samples)
