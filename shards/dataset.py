"""Reading a dataset back: the shard URLs of a split, samples of a shard, index files."""
from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from stagewise.shards.layout import index_name
from stagewise.shards.manifest import SplitInfo, read_manifest
from stagewise.shards.schema import Sample, sample_from_members
from stagewise.shards.store import join_url, open_url


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


def iter_tar_members(fileobj: IO[bytes]) -> Iterator[tuple[str, str, bytes]]:
    """(key, extension, payload) for each regular file, in tar order, streaming."""
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            base = info.name.rsplit("/", 1)[-1]
            if "." not in base or base.startswith("."):
                continue
            key, ext = base.split(".", 1)
            prefix = info.name[: len(info.name) - len(base)]
            data = tar.extractfile(info).read()  # type: ignore[union-attr]
            yield prefix + key, ext, data


def iter_samples(shard_url: str) -> Iterator[Sample]:
    """Samples of one shard; raises SampleError naming a malformed sample."""
    with open_url(shard_url, "rb") as f:
        key: str | None = None
        members: dict[str, bytes] = {}
        for k, ext, data in iter_tar_members(f):
            if k != key:
                if key is not None:
                    yield sample_from_members(key, members)
                key, members = k, {}
            members[ext] = data
        if key is not None:
            yield sample_from_members(key, members)


def read_index(index_url: str) -> str:
    with open_url(index_url, "rb") as f:
        return f.read().decode("ascii")


def iter_meta(shard_url: str, index_url: str) -> Iterator[dict]:
    """The json member of every sample, read through the index with ranged reads
    (a few KB per sample instead of the whole shard)."""
    from stagewise.shards.schema import META_EXT, decode_meta

    lines = read_index(index_url).splitlines()[1:]
    with open_url(shard_url, "rb") as f:
        for line in lines:
            fields = line.split()
            for i in range(0, len(fields), 4):
                if fields[i] == META_EXT:
                    f.seek(int(fields[i + 1]))
                    yield decode_meta(f.read(int(fields[i + 2])))
