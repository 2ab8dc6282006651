"""`ShardStream`: streaming samples out of shards with fsspec (local paths or s3://), ahead of the pipeline.

Background threads read the samples an `EpochPlan` needs, in input order, as
ranged reads located by each shard's `.idx` file (one GET per run of up to
`RUN_SAMPLES` consecutive samples, not one per member). The consumer takes them
by input index. Reading is gated: input index i is read only once the consumer
has asked for output positions up to i - buffer - lookahead, so memory stays at
about buffer + lookahead samples.

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
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

import fsspec
import numpy as np

from stagewise.shards import IMAGE_EXT, LABEL_EXT, META_EXT, SampleError, decode_label, decode_meta, targets_from_meta
from stagewise.shards.index import parse_index
from stagewise.shards.jpeg import read_frame_header
from stagewise.shards.tar import split_member_name
from stagewise.loaders.plan import EpochPlan

RUN_SAMPLES = 32  # samples per ranged read (~3 MB of 100 KB JPEGs: one GET)
INDEX_CACHE = 64  # parsed .idx files kept per stream
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
        buffer: int,
        lookahead: int,
        max_pixels: int | None,
        wrap: Callable[[bytes], object] | None = None,
    ) -> None:
        self.urls, self.index_urls, self.sizes = shard_urls, index_urls, shard_sizes
        self.plan, self.multi_label, self.num_classes = plan, multi_label, num_classes
        self.retries, self.backoff, self.timeout = retries, backoff, timeout
        self.slack = buffer + lookahead
        self.max_pixels = max_pixels
        self.wrap = wrap  # applied to each JPEG in the reader threads, off the consumer's thread
        self.retried = 0  # transient errors that were retried (for tests and logs)
        self.cpu_s = 0.0  # CPU seconds spent in the reader threads (bench-loader's accounting)
        self._held: dict[int, Item | Fault] = {}
        self._index: OrderedDict[int, list | _ShardError] = OrderedDict()
        self._cond = threading.Condition()
        self._gate = 0
        self._stop = False
        self._crash: BaseException | None = None
        rest = start_position
        needed = np.unique(plan.order[rest:][plan.real[rest:]])
        self._runs = deque(self._make_runs(needed))
        self._threads = [threading.Thread(target=self._work, name=f"shard-reader-{k}", daemon=True) for k in range(threads)]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------ consumer side
    def advance(self, position: int) -> None:
        """The consumer will soon need output positions < `position`: allow reading inputs up to there + slack."""
        with self._cond:
            if position + self.slack > self._gate:
                self._gate = position + self.slack
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
    def _make_runs(self, needed: np.ndarray) -> list[tuple[int, list[int], list[int]]]:
        """(shard, input indices, sample indices) of up to RUN_SAMPLES consecutive samples of one shard.

        Vectorized (it runs on the consumer's thread when an epoch opens): a run breaks where the
        shard changes, where the samples stop being consecutive, and every RUN_SAMPLES samples.
        """
        if len(needed) == 0:
            return []
        seg, sample = self.plan.locate(needed)
        shard = np.array([s[0] for s in self.plan.segments], np.int64)[seg]
        group = np.concatenate([[0], np.cumsum((np.diff(shard) != 0) | (np.diff(sample) != 1))])
        first = np.concatenate([[0], np.flatnonzero(np.diff(group)) + 1])  # index where each group starts
        offset = np.arange(len(needed)) - np.repeat(first, np.diff(np.append(first, len(needed))))
        starts = np.flatnonzero(np.concatenate([[True], np.diff(group) != 0]) | (offset % RUN_SAMPLES == 0))
        bounds = np.append(starts, len(needed)).tolist()
        inputs, samples, shards = needed.tolist(), sample.tolist(), shard[starts].tolist()
        return [(shards[r], inputs[a:b], samples[a:b]) for r, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]

    def _work(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stop and self._runs and self._runs[0][1][0] >= self._gate:
                        self._cond.wait(1.0)
                    if self._stop or not self._runs:
                        return
                    shard, inputs, samples = self._runs.popleft()
                start = time.thread_time()
                results = self._read_run(shard, inputs, samples)
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
        with self._cond:
            cached = self._index.get(shard)
        if cached is None:
            index_url = self.index_urls[shard]
            try:
                fs, path = fsspec.core.url_to_fs(index_url)
                text = self._retrying(f"reading index {index_url}", lambda: fs.cat_file(path))
                cached = parse_index(text.decode("ascii", errors="replace"), index_url)
                if len(cached) != self.sizes[shard]:
                    raise _ShardError(f"{index_url} lists {len(cached)} samples, the manifest {self.sizes[shard]}")
            except ValueError as exc:
                cached = _ShardError(str(exc))
            except _ShardError as exc:
                cached = exc
            with self._cond:
                self._index[shard] = cached
                while len(self._index) > INDEX_CACHE:
                    self._index.popitem(last=False)
        if isinstance(cached, _ShardError):
            raise cached
        return cached

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
