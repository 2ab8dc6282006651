"""`ShardStream`: streaming samples out of shards with fsspec (local paths or s3://), ahead of the pipeline.

Background threads read the samples an `EpochPlan` needs as ranged reads located by
each shard's `.idx` file (one GET per run of consecutive samples, not one per member).
The consumer takes them by input index. A run is read once the consumer has asked for
output positions up to the first position that needs one of its samples, less
`lookahead`; runs are read in that order. A training plan is consumed P partitions side
by side (one sample of each per batch), so runs are cut shorter when P is large
(`run_length`): memory stays at about P x (run length + shuffle buffer) + lookahead samples.

Faults never hang and always name the shard:
- a missing or unreadable shard or index: every sample of it becomes a `Fault`;
- transient errors (connection, timeout, S3 5xx): retried `retries` times with
  exponential backoff (`backoff` seconds, doubling), then a `Fault`;
- a sample without jpg or cls, a bad label, or a payload that is not a JPEG: a `Fault`;
- a JPEG whose frame header claims more than `max_pixels` pixels (a decompression
  bomb, or a huge photo in shards another tool wrote): a `Fault`, before DALI sees it;
- a reader that makes no progress for `timeout` seconds: `LoaderError`.
What a Fault becomes (raise or skip-and-count) is the loader's policy.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import fsspec
import numpy as np

from stagewise.shards import IMAGE_EXT, LABEL_EXT, META_EXT, SampleError, decode_label, decode_meta, targets_from_meta
from stagewise.shards.index import parse_index
from stagewise.shards.jpeg import read_frame_header
from stagewise.shards.tar import split_member_name
from stagewise.loaders.plan import EpochPlan

RUN_SAMPLES = 32  # samples per ranged read at most (~3 MB of 100 KB JPEGs: one GET)
RUN_BUDGET = 1024  # samples in the runs of all partitions together (~100 MB of 100 KB JPEGs), see `run_length`
INDEX_CACHE = 64  # parsed .idx files kept at least, see `IndexCache`
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, SampleError, ValueError)


class LoaderError(RuntimeError):
    """A fault the loader cannot (or, by policy, may not) work around; the message names the shard."""


@dataclass(frozen=True)
class Item:
    key: str
    jpg: bytes
    label: int  # the cls member
    labels: tuple[int, ...]  # (label,), or json["labels"] in multi-label datasets
    height: int  # from the JPEG frame header
    width: int
    shard: str  # URL
    view: object = None  # the JPEG wrapped for the consumer by the stream's `wrap` (a DALI tensor), or None


@dataclass(frozen=True)
class Fault:
    shard: str  # URL
    key: str | None
    reason: str

    def describe(self) -> str:
        where = f"{self.shard}: sample {self.key!r}" if self.key else self.shard
        return f"{where}: {self.reason}"


class _ShardError(Exception):
    pass


def run_length(partitions: int) -> int:
    """Samples per ranged read when a plan is consumed `partitions` streams side by side: RUN_SAMPLES,
    shortened so that one partly consumed run per partition stays within RUN_BUDGET samples."""
    return max(1, min(RUN_SAMPLES, RUN_BUDGET // partitions))


class IndexCache:
    """Parsed `.idx` files by shard index, shared by a loader's streams so that a new epoch reads no index
    again (a small split's whole set stays); least recently used first out beyond `capacity`. Thread-safe."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._parsed: OrderedDict[int, list] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, shard: int) -> list | None:
        with self._lock:
            parsed = self._parsed.get(shard)
            if parsed is not None:
                self._parsed.move_to_end(shard)
            return parsed

    def put(self, shard: int, parsed: list) -> None:
        with self._lock:
            self._parsed[shard] = parsed
            self._parsed.move_to_end(shard)
            while len(self._parsed) > self.capacity:
                self._parsed.popitem(last=False)


class ShardStream:
    def __init__(
        self,
        shard_urls: list[str],
        index_urls: list[str],
        shard_sizes: list[int],
        plan: EpochPlan,
        *,
        start_position: int,
        multi_label: bool,
        num_classes: int,
        threads: int,
        retries: int,
        backoff: float,
        timeout: float,
        lookahead: int,
        max_pixels: int | None,
        index_cache: IndexCache | None = None,
        wrap: Callable[[bytes], object] | None = None,
    ) -> None:
        self.urls, self.index_urls, self.sizes = shard_urls, index_urls, shard_sizes
        self.plan, self.multi_label, self.num_classes = plan, multi_label, num_classes
        self.retries, self.backoff, self.timeout = retries, backoff, timeout
        self.lookahead = lookahead  # output positions: a run is read this far before it is first needed
        self.max_pixels = max_pixels
        self.wrap = wrap  # applied to each JPEG in the reader threads, off the consumer's thread
        self.retried = 0  # transient errors that were retried (for tests and logs)
        self.cpu_s = 0.0  # CPU seconds spent in the reader threads (bench-loader's accounting)
        self._held: dict[int, Item | Fault] = {}
        self._index = index_cache or IndexCache(INDEX_CACHE)
        self._failed: dict[int, _ShardError] = {}  # indexes that failed: faults for this epoch, read again in the next
        self._cond = threading.Condition()
        self._gate = 0
        self._stop = False
        self._crash: BaseException | None = None
        self._inputs, self._samples, self._shards, self._bounds, self._keys = self._make_runs(start_position)
        self._next_run = 0  # runs are taken in the order of `_keys`
        self._threads = [threading.Thread(target=self._work, name=f"shard-reader-{k}", daemon=True) for k in range(threads)]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------ consumer side
    def advance(self, position: int) -> None:
        """The consumer will soon need output positions < `position`: read the runs first needed before there + lookahead."""
        with self._cond:
            if position + self.lookahead > self._gate:
                self._gate = position + self.lookahead
                self._cond.notify_all()

    def take(self, index: int) -> Item | Fault:
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while index not in self._held:
                if self._crash is not None:
                    raise LoaderError(f"shard reader crashed: {self._crash!r}") from self._crash
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LoaderError(
                        f"timed out after {self.timeout:.0f}s waiting for {self._where(index)} "
                        "(the reader made no progress; is the store reachable?)"
                    )
                self._cond.wait(min(left, 1.0))
            return self._held.pop(index)

    def take_many(self, indices) -> list[Item | Fault]:
        """`take` for a batch of input indices, under one lock when they are all there already."""
        with self._cond:
            held = self._held
            if all(i in held for i in indices):
                return [held.pop(i) for i in indices]
        return [self.take(i) for i in indices]

    def read_now(self, index: int) -> Item | Fault:
        """Read one input synchronously (eval padding after a resume)."""
        seg, sample = self.plan.locate(np.array([index]))
        return self._read_run(int(self.plan.segments[seg[0]][0]), [index], [int(sample[0])])[0][1]

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._held.clear()
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=10)

    # ------------------------------------------------------------ reader threads
    def _make_runs(self, start: int) -> tuple[np.ndarray, ...]:
        """The ranged reads the output positions from `start` on need, in the order of the first output
        position that needs each: (input indices, sample indices) of the needed inputs in input order,
        then per run its shard, its [a, b) bounds into those two arrays, and that first position.

        Vectorized, and kept as arrays that the reader threads slice as they go (an ImageNet epoch
        on one rank with G = 4096 is 1.28 M runs of one sample): a run breaks where the shard changes,
        where the samples stop being consecutive, at the plan's breaks (a partition's start, its
        rotation point) and every `run_length` samples.
        """
        positions = np.arange(start, len(self.plan.order))[self.plan.real[start:]]
        if len(positions) == 0:
            empty = np.zeros(0, np.int64)
            return empty, empty, empty, np.zeros((0, 2), np.int64), empty
        needed, first = np.unique(self.plan.order[positions], return_index=True)  # sorted; where each first appears
        first_needed = positions[first]
        seg, sample = self.plan.locate(needed)
        shard = np.array([s[0] for s in self.plan.segments], np.int64)[seg]
        cut = (np.diff(shard) != 0) | (np.diff(sample) != 1) | np.isin(needed[1:], self.plan.breaks)
        head = np.concatenate([[0], np.flatnonzero(cut) + 1])  # where each contiguous group starts
        offset = np.arange(len(needed)) - np.repeat(head, np.diff(np.append(head, len(needed))))
        starts = np.flatnonzero(np.concatenate([[True], cut]) | (offset % run_length(self.plan.partitions) == 0))
        keys = np.minimum.reduceat(first_needed, starts)
        bounds = np.stack([starts, np.append(starts[1:], len(needed))], axis=1)
        order = np.argsort(keys, kind="stable")
        return needed, sample, shard[starts][order], bounds[order], keys[order]

    def _work(self) -> None:
        try:
            while True:
                with self._cond:
                    while (not self._stop and self._next_run < len(self._keys)
                           and self._keys[self._next_run] >= self._gate):
                        self._cond.wait(1.0)
                    if self._stop or self._next_run >= len(self._keys):
                        return
                    run, self._next_run = self._next_run, self._next_run + 1
                start = time.thread_time()
                a, b = self._bounds[run].tolist()
                results = self._read_run(int(self._shards[run]), self._inputs[a:b].tolist(), self._samples[a:b].tolist())
                with self._cond:
                    self.cpu_s += time.thread_time() - start
                    if self._stop:
                        return
                    self._held.update(results)
                    self._cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, never swallowed
            with self._cond:
                self._crash = exc
                self._cond.notify_all()

    def _where(self, index: int) -> str:
        seg, sample = self.plan.locate(np.array([index]))
        return f"sample {int(sample[0])} of {self.urls[self.plan.segments[seg[0]][0]]}"

    def _retrying(self, what: str, call):
        for attempt in range(self.retries + 1):
            try:
                return call()
            except _PERMANENT as exc:
                raise _ShardError(f"{what} failed: {type(exc).__name__}: {exc}") from exc
            except Exception as exc:  # noqa: BLE001 - connection errors, timeouts, S3 5xx: transient
                if attempt == self.retries:
                    raise _ShardError(
                        f"{what} failed after {attempt + 1} attempts: {type(exc).__name__}: {exc}"
                    ) from exc
                with self._cond:
                    self.retried += 1
                time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    def _shard_index(self, shard: int) -> list:
        cached = self._index.get(shard)
        if cached is not None:
            return cached
        with self._cond:
            failed = self._failed.get(shard)
        if failed is not None:
            raise failed
        index_url = self.index_urls[shard]
        try:
            fs, path = fsspec.core.url_to_fs(index_url)
            text = self._retrying(f"reading index {index_url}", lambda: fs.cat_file(path))
            parsed = parse_index(text.decode("ascii", errors="replace"), index_url)
            if len(parsed) != self.sizes[shard]:
                raise _ShardError(f"{index_url} lists {len(parsed)} samples, the manifest {self.sizes[shard]}")
        except (ValueError, _ShardError) as exc:
            error = exc if isinstance(exc, _ShardError) else _ShardError(str(exc))
            with self._cond:
                self._failed[shard] = error
            raise error from None
        self._index.put(shard, parsed)
        return parsed

    def _read_run(self, shard: int, inputs: list[int], samples: list[int]) -> list[tuple[int, Item | Fault]]:
        url = self.urls[shard]
        try:
            index = self._shard_index(shard)
            members = [index[k] for k in samples]
            lo = min(off for m in members for off, _, _ in m.values())
            hi = max(off + size for m in members for off, size, _ in m.values())
            fs, path = fsspec.core.url_to_fs(url)
            data = self._retrying(f"reading bytes {lo}-{hi} of {url}", lambda: fs.cat_file(path, start=lo, end=hi))
            if len(data) != hi - lo:
                raise _ShardError(f"short read: {len(data)} of {hi - lo} bytes at offset {lo} (truncated shard?)")
        except _ShardError as exc:
            return [(i, Fault(url, None, str(exc))) for i in inputs]
        return [(i, self._item(url, m, data, lo)) for i, m in zip(inputs, members)]

    def _item(self, url: str, members: dict, data: bytes, base: int) -> Item | Fault:
        name = next(iter(members.values()))[2]
        key = (split_member_name(name) or (name, ""))[0]  # webdataset's rule: the key ends at the first dot

        def payload(ext: str) -> bytes:
            off, size, _ = members[ext]
            return data[off - base : off - base + size]

        missing = [ext for ext in (IMAGE_EXT, LABEL_EXT) if ext not in members]
        if self.multi_label and META_EXT not in members:
            missing.append(META_EXT)
        if missing:
            return Fault(url, key, f"lacks member(s) {missing} (has {sorted(members)})")
        try:
            label = decode_label(payload(LABEL_EXT))
            labels = [label]
            if self.multi_label:
                labels = targets_from_meta(decode_meta(payload(META_EXT)))
            bad = [x for x in labels if not 0 <= x < self.num_classes]
            if bad:
                raise SampleError(f"label(s) {bad} outside 0..{self.num_classes - 1}")
            jpg = payload(IMAGE_EXT)
            frame = read_frame_header(jpg)
            if self.max_pixels is not None and frame.pixels > self.max_pixels:
                raise SampleError(
                    f"decompression bomb: the frame header says {frame.width}x{frame.height} = {frame.pixels} pixels, "
                    f"over the limit of {self.max_pixels} (ReadSpec.max_pixels, as build-shards --max-pixels)"
                )
        except SampleError as exc:
            return Fault(url, key, str(exc))
        return Item(key, jpg, label, tuple(labels), frame.height, frame.width, url,
                    self.wrap(jpg) if self.wrap is not None else None)
