"""Helpers for the loader tests (no tests here): datasets whose images say which sample they are."""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stagewise.shards import Sample, ShardWriter, build_index, make_key, shard_name, index_name
from stagewise.shards.manifest import Manifest, ShardInfo, SplitInfo, write_manifest

LEVELS = (24, 76, 128, 180, 232)  # 5 levels per channel, 52 apart: JPEG and resizing stay far inside


def colour_of(sample_id: int) -> tuple[int, int, int]:
    if not 0 <= sample_id < len(LEVELS) ** 3:
        raise ValueError(sample_id)
    n = len(LEVELS)
    return LEVELS[sample_id // (n * n)], LEVELS[(sample_id // n) % n], LEVELS[sample_id % n]


def jpeg_of(sample_id: int, size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour_of(sample_id)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def write_unique_tree(root: Path, num_classes: int, per_class: int) -> dict[int, int]:
    """`root/class_k/s_<id>.jpg` with a colour unique to each sample; returns id -> class."""
    labels = {}
    for c in range(num_classes):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            sample_id = c * per_class + i
            (root / f"class_{c}" / f"s_{sample_id}.jpg").write_bytes(jpeg_of(sample_id))
            labels[sample_id] = c
    return labels


def pixel_means(images: torch.Tensor, mean: float = 0.5, std: float = 0.5) -> np.ndarray:
    """[N, 3] mean colour of each output image on the 0..255 scale (undoing the normalization)."""
    x = images.float() * std + mean
    return (x.mean(dim=(2, 3)) * 255).cpu().numpy()


def sample_ids(images: torch.Tensor) -> list[int]:
    n = len(LEVELS)
    ids = []
    for r, g, b in pixel_means(images):
        idx = [int(np.argmin([abs(v - level) for level in LEVELS])) for v in (r, g, b)]
        ids.append(idx[0] * n * n + idx[1] * n + idx[2])
    return ids


def write_raw_split(dest: Path, split: str, shards: list[list[dict[str, bytes]]], classes: tuple[str, ...],
                    multi_label: bool = False) -> None:
    """Shards from raw members per sample ({"__key__": b"...", "jpg": ..., ...}), written by hand so
    that tests can make samples the shard writer would refuse (a missing cls, a non-JPEG payload)."""
    dest.mkdir(parents=True, exist_ok=True)
    infos = []
    for k, samples in enumerate(shards):
        name = shard_name(split, k)
        entries = []
        with tarfile.open(dest / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                key = sample["__key__"].decode()
                members = []
                for ext, payload in sample.items():
                    if ext == "__key__":
                        continue
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    members.append((ext, tar.offset + 512, len(payload), info.name))
                    tar.addfile(info, io.BytesIO(payload))
                entries.append(members)
        (dest / index_name(name)).write_text(build_index(entries))
        infos.append(ShardInfo(name, len(samples), os.path.getsize(dest / name), "0" * 64))
    total = sum(len(s) for s in shards)
    write_manifest(str(dest), Manifest(layout="folder", splits={
        split: SplitInfo(total, classes, tuple(infos), multi_label=multi_label)}))


def write_samples(dest: Path, split: str, shards: list[list[Sample]], classes: tuple[str, ...],
                  multi_label: bool = False) -> None:
    """Shards through the contract's own ShardWriter (for multi-label samples)."""
    dest.mkdir(parents=True, exist_ok=True)
    infos = []
    for k, samples in enumerate(shards):
        name = shard_name(split, k)
        writer = ShardWriter(str(dest / name))
        for sample in samples:
            writer.write(sample)
        written = writer.close()
        (dest / index_name(name)).write_text(written.index)
        infos.append(ShardInfo(name, written.num_samples, written.bytes, written.sha256))
    total = sum(len(s) for s in shards)
    write_manifest(str(dest), Manifest(layout="folder", splits={
        split: SplitInfo(total, classes, tuple(infos), multi_label=multi_label)}))


def unique_sample(sample_id: int, label: int, labels: tuple[int, ...] | None = None) -> Sample:
    return Sample(key=make_key(f"s_{sample_id}"), jpg=jpeg_of(sample_id), label=label, class_name=f"c{label}",
                  source=f"s_{sample_id}.jpg", width=40, height=30, labels=labels)


def take(loader, epoch: int, count: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    out = []
    for batch in loader:
        out.append(batch)
        if count is not None and len(out) == count:
            break
    return out
