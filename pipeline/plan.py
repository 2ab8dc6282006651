"""The build plan and its unit of work: inputs ordered and cut into shard tasks; `build_one` builds one task.

The plan is made up front and deterministically from `--seed`: inputs are
ordered by a keyed hash of their source path (a shuffle that does not depend on
the platform, and that moves few samples when a file is added), then cut into
shards. Each shard is one task, so any executor (local processes, Ray) builds
the same bytes; a journal record written after each shard makes a rerun skip
finished work.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field

from stagewise.pipeline.imagefix import Rejected, normalize_image
from stagewise.shards.jpeg import DEFAULT_MAX_PIXELS
from stagewise.pipeline.sources import InputFile
from stagewise.shards import Sample, ShardInfo, ShardWriter, index_name, journal_name, make_key, shard_name
from stagewise.shards.layout import temp_name
from stagewise.shards.store import (is_local, join_url, local_path, open_url, publish_file, sha256_of, url_exists,
                                    write_atomic)

DEFAULT_SHARD_BYTES = 256 * 2**20


@dataclass(frozen=True)
class EncodeOptions:
    max_side: int | None = None
    quality: int = 90
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode_copies: bool = True  # decode JPEGs copied byte for byte, to catch corrupt scans


@dataclass(frozen=True)
class ShardTask:
    dest: str
    name: str
    inputs: tuple[InputFile, ...]
    options: EncodeOptions

    @property
    def plan_id(self) -> str:
        """Changes whenever anything that shapes this shard's bytes changes."""
        h = hashlib.sha256(json.dumps(asdict(self.options), sort_keys=True).encode())
        for x in self.inputs:
            h.update(f"\0{x.source}\0{x.labels or x.label}\0{x.size}".encode())
        return h.hexdigest()


@dataclass
class ShardResult:
    name: str
    info: ShardInfo | None  # None when every input was rejected (no file is written)
    rejects: list[tuple[str, str]] = field(default_factory=list)
    fixes: dict[str, int] = field(default_factory=dict)
    fixed: int = 0
    copied: int = 0
    bytes_in: int = 0
    class_counts: dict[int, int] = field(default_factory=dict)
    resumed: bool = False


_progress = None  # a shared counter of processed inputs, set in each worker


def init_worker(counter) -> None:
    """Pool initializer: `counter` counts the inputs each worker has processed, for the progress bar."""
    global _progress
    _progress = counter


def _tick() -> None:
    if _progress is not None:
        with _progress.get_lock():
            _progress.value += 1


def _temp_path(task: ShardTask) -> str:
    if is_local(task.dest):
        folder = local_path(task.dest)
        os.makedirs(folder, exist_ok=True)
        return os.path.join(folder, temp_name(task.name, hidden=True))  # same file system: rename is atomic
    fd, path = tempfile.mkstemp(suffix=".tar")
    os.close(fd)
    return path


def build_one(task: ShardTask) -> ShardResult:
    """Build, publish and journal one shard. Runs in a worker process."""
    result = ShardResult(name=task.name, info=None)
    fixes: Counter[str] = Counter()
    counts: Counter[int] = Counter()
    tmp = _temp_path(task)
    writer = ShardWriter(tmp)
    try:
        for item in task.inputs:
            try:
                data = item.read()
            except OSError as exc:
                result.rejects.append((item.source, f"unreadable: {exc.strerror or exc}"))
                _tick()
                continue
            result.bytes_in += len(data)
            try:
                img = normalize_image(data, max_side=task.options.max_side, quality=task.options.quality,
                                      max_pixels=task.options.max_pixels, decode_copies=task.options.decode_copies)
            except Rejected as exc:
                result.rejects.append((item.source, str(exc)))
                _tick()
                continue
            writer.write(Sample(key=make_key(item.source), jpg=img.jpg, label=item.label, class_name=item.class_name,
                                source=item.source, width=img.width, height=img.height, labels=item.labels))
            fixes.update(img.fixes)
            result.fixed += bool(img.fixes)
            result.copied += not img.fixes
            counts[item.label] += 1
            _tick()
        written = writer.close()
    except BaseException:
        writer.abort()
        os.path.exists(tmp) and os.unlink(tmp)
        raise
    if written.num_samples:
        publish_file(tmp, join_url(task.dest, task.name))
        write_atomic(join_url(task.dest, index_name(task.name)), written.index.encode("ascii"))
        result.info = ShardInfo(task.name, written.num_samples, written.bytes, written.sha256)
    else:
        os.unlink(tmp)
    result.fixes, result.class_counts = dict(fixes), dict(counts)
    record = {"plan_id": task.plan_id, **asdict(result)}
    write_atomic(join_url(task.dest, journal_name(task.name)), json.dumps(record).encode())
    return result


def finished_result(task: ShardTask) -> ShardResult | None:
    """The journalled result of `task` if its shard is complete and verified, else None."""
    record_url = join_url(task.dest, journal_name(task.name))
    if not url_exists(record_url):
        return None
    with open_url(record_url, "rb") as f:
        record = json.loads(f.read())
    if record.pop("plan_id") != task.plan_id:
        return None
    info_fields = record.pop("info")
    info = ShardInfo(**info_fields) if info_fields is not None else None
    if info is not None:
        shard_url = join_url(task.dest, info.name)
        if not (url_exists(shard_url) and url_exists(join_url(task.dest, index_name(info.name)))):
            return None
        if sha256_of(shard_url) != info.sha256:
            return None
    result = ShardResult(name=task.name, info=info, **{k: v for k, v in record.items() if k not in ("name", "resumed")})
    result.rejects = [tuple(r) for r in result.rejects]  # type: ignore[misc]
    result.class_counts = {int(k): v for k, v in result.class_counts.items()}
    result.resumed = True
    return result


def hash_order(seed: int, salt: str, inputs: list[InputFile]) -> list[InputFile]:
    """A seeded shuffle: inputs sorted by sha256(seed, salt, source)."""
    return sorted(inputs, key=lambda x: hashlib.sha256(f"{seed}\0{salt}\0{x.source}".encode()).digest())


def carve_holdout(inputs: list[InputFile], n: int, seed: int) -> tuple[list[InputFile], list[InputFile]]:
    """(rest, holdout): `n` inputs taken round-robin over classes, seeded, so it is class-balanced."""
    if n <= 0:
        return inputs, []
    if n >= len(inputs):
        raise ValueError(f"--holdout {n} must be smaller than the {len(inputs)} inputs")
    by_class: dict[int, list[InputFile]] = {}
    for x in hash_order(seed, "holdout", inputs):
        by_class.setdefault(x.label, []).append(x)
    queues = [by_class[k] for k in sorted(by_class)]
    taken: set[str] = set()
    depth = 0
    while len(taken) < n:
        for q in queues:
            if depth < len(q) and len(taken) < n:
                taken.add(q[depth].source)
        depth += 1
    return [x for x in inputs if x.source not in taken], [x for x in inputs if x.source in taken]


def random_holdout(inputs: list[InputFile], n: int, seed: int) -> tuple[list[InputFile], list[InputFile]]:
    """(rest, holdout): `n` inputs picked uniformly at random, seeded (paper §5.2), not class-balanced:
    21k has synsets with a handful of images, which a per-class holdout would empty."""
    if n <= 0:
        return inputs, []
    if n >= len(inputs):
        raise ValueError(f"--holdout {n} must be smaller than the {len(inputs)} inputs")
    taken = {x.source for x in hash_order(seed, "holdout", inputs)[:n]}
    return [x for x in inputs if x.source not in taken], [x for x in inputs if x.source in taken]


def plan_shards(dest: str, split: str, inputs: list[InputFile], seed: int, samples_per_shard: int | None,
                shard_bytes: int, options: EncodeOptions) -> list[ShardTask]:
    ordered = hash_order(seed, split, inputs)
    groups: list[list[InputFile]] = [[]]
    size = 0
    for x in ordered:
        full = len(groups[-1]) >= samples_per_shard if samples_per_shard else size + x.size > shard_bytes
        if groups[-1] and full:
            groups.append([])
            size = 0
        groups[-1].append(x)
        size += x.size
    return [ShardTask(dest, shard_name(split, i), tuple(g), options) for i, g in enumerate(groups) if g]
