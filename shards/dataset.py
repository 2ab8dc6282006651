"""Reading a dataset back: a split's shard URLs (from the manifest), the samples of a shard, its index file."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from stagewise.shards.index import parse_index
from stagewise.shards.layout import index_name
from stagewise.shards.manifest import SplitInfo, read_manifest
from stagewise.shards.schema import META_EXT, Sample, decode_meta, sample_from_members
from stagewise.shards.store import join_url, open_url
from stagewise.shards.tar import group_by_key, iter_tar, split_member_name


@dataclass(frozen=True)
class SplitView:
    """One split of a dataset at `dest`, with absolute URLs for its shards and indexes."""

    dest: str
    name: str
    info: SplitInfo

    @property
    def shard_urls(self) -> list[str]:
        return [join_url(self.dest, s.name) for s in self.info.shards]

    @property
    def index_urls(self) -> list[str]:
        return [join_url(self.dest, index_name(s.name)) for s in self.info.shards]

    @property
    def num_samples(self) -> int:
        return self.info.num_samples

    @property
    def classes(self) -> tuple[str, ...]:
        return self.info.classes

    @property
    def num_classes(self) -> int:
        return len(self.info.classes)


def open_split(dest: str, split: str) -> SplitView:
    return SplitView(dest=dest.rstrip("/"), name=split, info=read_manifest(dest).split(split))


def iter_samples(shard_url: str) -> Iterator[Sample]:
    """Samples of one shard; raises SampleError naming a malformed sample."""
    with open_url(shard_url, "rb") as f:
        named = ((split_member_name(m.name), m.data) for m in iter_tar(f) if m.data is not None)
        members = ((kx[0], (kx[1], data)) for kx, data in named if kx is not None)
        for key, group in group_by_key(members):
            yield sample_from_members(key, dict(group))


def read_index(index_url: str) -> str:
    with open_url(index_url, "rb") as f:
        return f.read().decode("ascii")


def iter_meta(shard_url: str, index_url: str) -> Iterator[dict]:
    """The json member of every sample, read through the index with ranged reads
    (a few KB per sample instead of the whole shard)."""
    samples = parse_index(read_index(index_url), index_url)
    with open_url(shard_url, "rb") as f:
        for members in samples:
            if META_EXT in members:
                offset, size, _name = members[META_EXT]
                f.seek(offset)
                yield decode_meta(f.read(size))
