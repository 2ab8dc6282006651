"""verify-shards finds each kind of damage, even when the manifest's checksums have been made to agree.

Each case damages one thing, then rewrites manifest.json so that sha256, bytes
and sample counts match the damaged shard: the checksum cannot catch it, only
the check named in the test can.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from stagewise.pipeline.build_shards import build_shards
from stagewise.pipeline.cli import main as cli
from stagewise.shards import read_manifest, write_manifest
from stagewise.benchmarks.datasets import write_photo_tree

SHARD = "train-000001.tar"


@pytest.fixture()
def dataset(tmp_path) -> Path:
    write_photo_tree(tmp_path / "src", num_classes=2, per_class=6)
    build_shards(str(tmp_path / "src"), str(tmp_path / "out"), samples_per_shard=4)
    assert cli(["verify-shards", str(tmp_path / "out"), "--workers", "1"]) == 0
    return tmp_path / "out"


def _rewrite_tar(path: Path, change: Callable[[tarfile.TarInfo, bytes], tuple[tarfile.TarInfo, bytes]]) -> None:
    """Rewrite a shard member by member through `change` (ustar, like ours)."""
    with tarfile.open(path) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as out:
        for info, data in members:
            info, data = change(info, data)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())


def _manifest_agrees(dest: Path, shard: str = SHARD) -> None:
    """Make the manifest's checksum and size of `shard` match its (damaged) bytes."""
    m = read_manifest(str(dest))
    data = (dest / shard).read_bytes()
    split = m.split("train")
    shards = tuple(dataclasses.replace(s, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
                   if s.name == shard else s for s in split.shards)
    write_manifest(str(dest), m.with_split("train", dataclasses.replace(split, shards=shards), m.layout))


def _verify(dest: Path, capsys) -> str:
    assert cli(["verify-shards", str(dest), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "sha256" not in out  # the checksum agrees: something else found the damage
    return out


def test_a_tar_with_a_bad_member(dataset, capsys):
    def rename_first_cls(info, data):
        if info.name.endswith(".cls") and not getattr(rename_first_cls, "done", False):
            rename_first_cls.done = True
            info.name = info.name[:-4] + ".txt"
        return info, data

    _rewrite_tar(dataset / SHARD, rename_first_cls)
    _manifest_agrees(dataset)
    out = _verify(dataset, capsys)
    assert f"BAD {SHARD}" in out and "unexpected member(s) ['txt']" in out and "lacks member(s) ['cls']" in out


def test_an_index_that_disagrees_with_its_tar(dataset, capsys):
    idx = dataset / SHARD.replace(".tar", ".idx")
    lines = idx.read_text().splitlines()
    lines[1], lines[2] = lines[2], lines[1]  # two samples' entries swapped: each points at the other's bytes
    idx.write_text("\n".join(lines) + "\n")
    out = _verify(dataset, capsys)
    assert f"index {idx.name} does not match the shard" in out


def test_a_jpeg_that_does_not_decode(dataset, capsys):
    def truncate_first_jpg(info, data):
        if info.name.endswith(".jpg") and not getattr(truncate_first_jpg, "done", False):
            truncate_first_jpg.done = True
            data = data[: len(data) // 2]  # the scan cut in half: headers intact, entropy data missing
        return info, data

    _rewrite_tar(dataset / SHARD, truncate_first_jpg)
    _manifest_agrees(dataset)
    out = _verify(dataset, capsys)
    assert "does not decode" in out


def test_a_wrong_class_count(dataset, capsys):
    m = read_manifest(str(dataset))
    split = m.split("train")
    counts = list(split.class_counts)
    counts[0], counts[1] = counts[0] + 1, counts[1] - 1  # same total, wrong split between classes
    write_manifest(str(dataset), m.with_split("train", dataclasses.replace(split, class_counts=tuple(counts)),
                                              m.layout))
    out = _verify(dataset, capsys)
    assert "BAD split train" in out and "samples per class differ from the manifest's class_counts" in out
