"""`--layout imagenet21k`: ImageNet-21k's per-synset tars, read in place, into multi-label inputs.

SRC is a folder of per-synset tars `nXXXXXXXX.tar` (how fall11_whole and
winter21_whole are distributed) or of already-extracted `nXXXXXXXX/` folders
(or a mix). Tars are never extracted: each member becomes an `InputFile` whose
`offset`/`size` point at its bytes inside the tar. Its source, the sample's
identity, is `nXXXXXXXX.tar/<member name>` (or `nXXXXXXXX/<file>`).

The same image file is often filed under several synsets. Every input is
identified by the sha256 of its bytes, and all copies of one image become ONE
sample that carries every label: `labels` sorted by label id (so `cls`, the
first, is the lowest label id), the canonical source being the copy with that
label (ties: the smallest source). Every 21k sample carries `labels`, one
label or many, so the split is marked multi-label throughout. Merging before
the holdout is carved also keeps any copy of a validation image out of train.

Finding the copies is a distributed hash join, never a single dict:
  map     each task reads a group of synsets and hashes every input; its
          records go to B buckets by the digest's leading bytes;
  shuffle bucket j of every map output goes to reduce task j (local: spill
          files in a scratch folder; Ray: object refs, the object store);
  reduce  each bucket sorts its records by digest and merges equal digests.
Map and reduce run in a process pool (`--workers`) or as Ray tasks
(`--executor ray`); with one worker they run in this process. The result does
not depend on the executor, the worker count or the bucket count.

Deviations and choices, named: each input is read twice (hashed here, then
encoded by `build_one`), which costs disk time and saves holding 1.3 TB of
records; 0-byte files are rejected here rather than merged (every empty file
has the same hash). With Ray on a cluster, SRC must be mounted at the same
path on every node.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context

from stagewise.pipeline.sources import InputFile, Scan, _files_under

DEFAULT_MAX_SIDE = 512  # px: 21k's longer sides; issue 6 default (most images are smaller and are copied as they are)
DEFAULT_HOLDOUT = 100_000  # images, "randomly picked 100,000 images as validation set" (paper §5.2)
HOLDOUT_SPLIT = "val"
TASKS_PER_WORKER = 4  # map tasks per worker, so a big synset does not leave the other workers idle
BUCKETS_PER_WORKER = 2  # reduce tasks per worker
MAX_BUCKETS = 64  # reduce is cheap next to map; map tasks x buckets objects pass through Ray's store
_FOLDER_FILE_BYTES = 110_000  # assumed bytes per file of an extracted folder, only to balance map tasks

Record = tuple[bytes, int, str, str, int, int]  # (sha256 digest, label, source, path, offset, size)
Reject = tuple[str, str]  # (source, reason)


@dataclass(frozen=True)
class Unit:
    """One synset's images: a tar read in place, or a folder."""

    synset: str
    path: str  # absolute
    is_tar: bool
    weight: int  # approximate bytes, to balance map tasks


def find_units(src: str) -> tuple[list[Unit], list[Reject]]:
    """The synset tars and folders directly under SRC; other files are rejected."""
    units: dict[str, Unit] = {}
    rejects: list[Reject] = []
    for name in sorted(os.listdir(src)):
        if name.startswith("."):
            continue
        full = os.path.join(src, name)
        if os.path.isdir(full):
            unit = Unit(name, full, False, _FOLDER_FILE_BYTES * len(os.listdir(full)))
        elif name.endswith(".tar") and os.path.isfile(full):
            unit = Unit(name[: -len(".tar")], full, True, os.path.getsize(full))
        else:
            rejects.append((name, "not a synset: expected a nXXXXXXXX.tar file or a nXXXXXXXX/ folder"))
            continue
        if unit.synset in units:
            raise ValueError(f"{src}: synset {unit.synset} is given twice, as {unit.synset}.tar and as {unit.synset}/")
        units[unit.synset] = unit
    return [units[k] for k in sorted(units)], rejects


_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))


def _compression(head: bytes) -> str | None:
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    return None


def _tar_inputs(unit: Unit, rejects: list[Reject]) -> Iterator[tuple[str, int, bytes]]:
    """(member name, data offset, bytes) of each regular member, read in place."""
    where = os.path.basename(unit.path)
    with open(unit.path, "rb") as f:
        kind = _compression(f.read(6))
        if kind is not None:
            rejects.append((where, f"compressed tar: {kind}; members can be read in place only from a plain .tar"))
            return
        f.seek(0)
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except tarfile.TarError as exc:
            rejects.append((where, f"not a tar: {exc}"))
            return
        seen: set[str] = set()
        members = 0
        try:
            for info in tar:
                name = info.name.removeprefix("./")
                if info.isdir() or os.path.basename(name).startswith("."):
                    continue
                source = f"{where}/{name}"
                if not info.isreg() or info.issparse():
                    rejects.append((source, "not a regular file: tar member is a link, device or sparse file"))
                    continue
                if name in seen:
                    rejects.append((source, "duplicate member name: an earlier member of the tar has the same name"))
                    continue
                seen.add(name)
                members += 1
                f.seek(info.offset_data)
                data = f.read(info.size)
                if len(data) < info.size:
                    rejects.append((source, f"unreadable: truncated tar member ({len(data)} of {info.size} bytes)"))
                    continue
                yield name, info.offset_data, data
            end = tar.offset
        except tarfile.TarError as exc:
            rejects.append((where, f"corrupt tar: {exc} (after {members} members; the rest are skipped)"))
            return
        f.seek(end)
        # tarfile stops quietly at a bad header; only zero padding may follow the last member
        if any(block.strip(b"\0") for block in iter(lambda: f.read(1 << 20), b"")):
            rejects.append((where, f"corrupt tar: unreadable header at byte {end} (after {members} members; "
                                   "the rest are skipped)"))


def _folder_inputs(unit: Unit, rejects: list[Reject]) -> Iterator[tuple[str, int, bytes]]:
    for path in _files_under(unit.path):
        name = os.path.relpath(path, unit.path).replace(os.sep, "/")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            rejects.append((f"{unit.synset}/{name}", f"unreadable: {exc.strerror or exc}"))
            continue
        yield name, -1, data


def bucket_of(digest: bytes, buckets: int) -> int:
    return int.from_bytes(digest[:8], "big") % buckets


def hash_units(units: list[Unit], label_of: dict[str, int], buckets: int) -> tuple[list[list[Record]], list[Reject]]:
    """Map: (records per bucket, rejects) for a group of synsets."""
    parts: list[list[Record]] = [[] for _ in range(buckets)]
    rejects: list[Reject] = []
    for unit in units:
        label = label_of[unit.synset]
        prefix = f"{unit.synset}.tar" if unit.is_tar else unit.synset
        reader = _tar_inputs if unit.is_tar else _folder_inputs
        try:
            for name, offset, data in reader(unit, rejects):
                source = f"{prefix}/{name}"
                if not data:
                    rejects.append((source, "empty file: 0 bytes"))
                    continue
                path = unit.path if unit.is_tar else os.path.join(unit.path, *name.split("/"))
                digest = hashlib.sha256(data).digest()
                parts[bucket_of(digest, buckets)].append((digest, label, source, path, offset, len(data)))
        except OSError as exc:
            rejects.append((os.path.basename(unit.path), f"unreadable: {exc.strerror or exc}"))
    return parts, rejects


def merge_bucket(parts: list[list[Record]], classes: tuple[str, ...]) -> tuple[list[InputFile], int]:
    """Reduce: one multi-label input per distinct digest, and how many inputs were folded into another."""
    records = sorted(r for part in parts for r in part)  # by digest, then label, then source
    inputs: list[InputFile] = []
    merged = 0
    i = 0
    while i < len(records):
        j = i
        while j < len(records) and records[j][0] == records[i][0]:
            j += 1
        _, label, source, path, offset, size = records[i]  # canonical copy: lowest label, then smallest source
        labels = tuple(sorted({r[1] for r in records[i:j]}))
        inputs.append(InputFile(source, path, label, classes[label], size, offset=offset, labels=labels))
        merged += j - i - 1
        i = j
    return inputs, merged


def _chunks(units: list[Unit], n: int) -> list[list[Unit]]:
    """`n` groups of about equal weight (largest first onto the lightest group), each sorted."""
    groups: list[list[Unit]] = [[] for _ in range(max(1, min(n, len(units))))]
    load = [0] * len(groups)
    for u in sorted(units, key=lambda u: (-u.weight, u.synset)):
        k = load.index(min(load))
        groups[k].append(u)
        load[k] += u.weight
    return [sorted(g, key=lambda u: u.synset) for g in groups if g]


# Local process pool: map outputs are spilled to one file per (map task, bucket).

def _spill_map(units: list[Unit], label_of: dict[str, int], buckets: int, folder: str, task: int):
    parts, rejects = hash_units(units, label_of, buckets)
    paths = []
    for j, part in enumerate(parts):
        path = os.path.join(folder, f"map{task:05d}-bucket{j:05d}.pkl")
        with open(path, "wb") as f:
            pickle.dump(part, f, protocol=pickle.HIGHEST_PROTOCOL)
        paths.append(path)
    return paths, rejects


def _spilled_reduce(paths: list[str], classes: tuple[str, ...]) -> tuple[list[InputFile], int]:
    parts = []
    for path in paths:
        with open(path, "rb") as f:
            parts.append(pickle.load(f))
    return merge_bucket(parts, classes)


def _join_local(groups: list[list[Unit]], label_of: dict[str, int], classes: tuple[str, ...], workers: int):
    buckets = min(MAX_BUCKETS, max(1, BUCKETS_PER_WORKER * workers))
    if workers <= 1:
        maps = [hash_units(g, label_of, buckets) for g in groups]
        reduced = [merge_bucket([m[0][j] for m in maps], classes) for j in range(buckets)]
        return reduced, [r for m in maps for r in m[1]]
    scratch = tempfile.mkdtemp(prefix="imagenet21k-join-")
    try:
        # spawn, as build_shards does: fork is unsafe once s3fs has started its event-loop thread
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_spill_map, g, label_of, buckets, scratch, k) for k, g in enumerate(groups)]
            maps = _gather(futures, [len(g) for g in groups])
            reduced = list(pool.map(_spilled_reduce, [[m[0][j] for m in maps] for j in range(buckets)],
                                    [classes] * buckets))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return reduced, [r for m in maps for r in m[1]]


def _gather(futures: list, synsets: list[int]) -> list:
    """Results in submission order, with a synset-count progress bar on a terminal (the map phase reads every
    byte of the tree: hours for the full 21k)."""
    from tqdm import tqdm

    index = {f: k for k, f in enumerate(futures)}
    with tqdm(total=sum(synsets), unit="synset", desc="hashing for duplicates", disable=None, file=sys.stderr) as bar:
        for f in as_completed(futures):
            bar.update(synsets[index[f]])
    return [f.result() for f in futures]  # re-raises a worker's error


def _map_returns(units: list[Unit], label_of: dict[str, int], buckets: int):
    parts, rejects = hash_units(units, label_of, buckets)
    return (*parts, rejects)  # one object ref per bucket, plus the rejects


def _reduce_args(classes: tuple[str, ...], *parts: list[Record]) -> tuple[list[InputFile], int]:
    return merge_bucket(list(parts), classes)  # refs passed as top-level arguments arrive resolved


def _join_ray(groups: list[list[Unit]], label_of: dict[str, int], classes: tuple[str, ...], buckets: int,
              ray_address: str | None):
    from stagewise.pipeline.ray_executor import connect, wait_all

    ray = connect(ray_address)
    mapper = ray.remote(num_cpus=1, max_retries=3)(_map_returns).options(num_returns=buckets + 1)
    reducer = ray.remote(num_cpus=1, max_retries=3)(_reduce_args)
    label_ref, classes_ref = ray.put(label_of), ray.put(classes)
    maps = [mapper.remote(g, label_ref, buckets) for g in groups]
    reduced = wait_all([reducer.remote(classes_ref, *[m[j] for m in maps]) for j in range(buckets)],
                       what="imagenet21k duplicate join (reduce)")
    tails = wait_all([m[buckets] for m in maps], what="imagenet21k duplicate join (map)")
    return reduced, [r for rejects in tails for r in rejects]


def scan_imagenet21k(src: str, classes: tuple[str, ...] | None, *, workers: int, executor: str,
                     ray_address: str | None) -> Scan:
    """Inputs of a 21k tree, copies merged into multi-label inputs; `classes` pins the label order."""
    units, rejects = find_units(src)
    if not units:
        raise ValueError(f"{src}: no synset tars (nXXXXXXXX.tar) or synset folders found")
    found = [u.synset for u in units]
    if classes is None:
        classes = tuple(found)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{src}: synset(s) {unknown[:10]} are not in the class list ({len(classes)} classes)")
    label_of = {c: i for i, c in enumerate(classes)}
    if executor == "ray":
        from stagewise.pipeline.ray_executor import cluster_cpus, connect

        connect(ray_address)
        cpus = cluster_cpus()
        groups = _chunks(units, TASKS_PER_WORKER * cpus)
        buckets = min(MAX_BUCKETS, BUCKETS_PER_WORKER * cpus)
        reduced, map_rejects = _join_ray(groups, label_of, classes, buckets, ray_address)
    else:
        groups = _chunks(units, TASKS_PER_WORKER * max(1, workers))
        reduced, map_rejects = _join_local(groups, label_of, classes, workers)
    inputs = sorted((x for part, _ in reduced for x in part), key=lambda x: x.source)
    merged = sum(m for _, m in reduced)
    return Scan(classes, inputs, sorted(rejects + map_rejects), duplicates=merged)
