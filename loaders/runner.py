"""Driving the built DALI pipelines: batch assembly, feeding, round-robin, exact stage changes, fault recovery.

The `Loader` owns the epochs: it opens each one (its plan and shard stream) and hands it
over (`begin`, `set_ahead`, `promote`). The runner only assembles, feeds and pulls.

Batches are fed in one global sequence; feed number s goes to pipeline s % P (on CPU,
P independent 1-thread pipelines: DALI runs a pipeline's CPU operators one after
another and RandAugment's per-sample branches leave threads idle, so 2 pipelines x 1
thread beat 1 x 2 on 2 cores; see docs/loader.md). Each pipeline holds up to `depth`
batches in flight. Every random draw of a sample depends on (seed, epoch, global step, its
slot in the global batch) only (loaders/feed.py), so which rank or pipeline runs it, and
when, changes nothing.

Stage changes: batches already in flight were fed with the old stage. When the
consumer pulls the next batch after `set_stage`, they are drained, discarded and fed
again with the new stage (same samples), so the change takes effect from the very
next batch pulled, at the cost of re-running at most P x depth batches.

Epoch boundaries (training): once the last batch of epoch e is fed and a pipeline has room,
`wanted_epoch` asks the Loader for e + 1, which it opens and hands over; its first batches
keep the pipelines fed. Epochs shorter than the pipelines' depth (a small split, one batch
an epoch) are handed over several at once, so the pipelines stay as full as within an
epoch. If the caller then starts e + 1 at batch 0, `promote` uses them.

Host decode (the CPU default, loaders/hostdecode.py): a flight is queued on its pipeline when
drawn, its crops go to the decoder's threads, and it is fed to DALI once they are done, in
queue order (`_push`: without waiting after each pull and feed; waiting when DALI must run
it next). A sample the host decoder fails on is replaced there like a reader fault; the
batch is drawn again for the replacements and DALI never sees the bad one.

A batch DALI fails on (a JPEG whose entropy data is corrupt behind a valid header; DALI's
pipeline object is invalid afterwards) takes the fault path: the pipeline is rebuilt,
a decode-only probe bisects the batch to find the samples that fail, and they are
replaced as `on_error="skip"` replaces reader faults (and remembered, so later epochs
replace them before DALI sees them); the batch is then run again. Under "raise" the
error names the one shard and key that failed.
"""
from __future__ import annotations

import time
import warnings
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from stagewise.loaders.feed import Drawn, Feeder, draw_batch
from stagewise.loaders.graph import Layout, build_pipeline, build_probe, input_names
from stagewise.loaders.handover import KeepAlive, to_torch
from stagewise.loaders.hostdecode import Decoding, HostDecoder
from stagewise.loaders.params import StageParams
from stagewise.loaders.plan import EpochPlan
from stagewise.loaders.shard_stream import Fault, Item, LoaderError, ShardStream
from stagewise.loaders.spec import AugmentSpec, EngineSpec

MAX_FAULTS_KEPT = 100  # descriptions kept in `faults`
MAX_RECOVERIES = 4  # fault-path rounds for one batch before giving up


@dataclass
class Epoch:
    number: int
    plan: EpochPlan
    stream: ShardStream
    next_feed: int  # next batch index to assemble and feed
    pad: Item | None = None  # eval padding material
    open_s: float = 0.0  # CPU seconds its opening took (plan and shard stream), on whichever thread opened it


@dataclass
class Flight:
    seq: int  # feed number: runs on pipeline seq % P
    epoch: Epoch
    batch: int
    stage: StageParams
    items: list[Item]  # as fed (faulty samples already replaced), kept to re-feed after a stage change
    real: np.ndarray  # bool [N]: False marks eval padding
    got: list[Item | Fault | None]  # as read, before replacement (the fault path replaces again from these)
    drawn: Drawn | None = None  # the inputs as fed: no_copy inputs must stay alive until the batch is out
    decoding: Decoding | None = None  # host decode: the batch's images on their way (fed to DALI once done)
    fed: bool = False  # handed to its pipeline (with host decode, some time after it was queued)
    dummy: bool = False  # a copy fed only to complete a pipeline's first prefetch; never yielded
    faults: list[Fault] = field(default_factory=list)  # samples replaced; reported when the batch is pulled

    @property
    def mix(self):
        return self.drawn.mix if self.drawn is not None else None


@dataclass
class Stats:
    """Consumer-thread accounting (seconds), for bench-loader: CPU time per part, wall time waiting."""

    batches: int = 0
    assemble: float = 0.0  # taking samples from the stream, replacing faults
    draw: float = 0.0  # crop windows, flips, RandAugment and mix draws
    feed: float = 0.0  # feed_input and schedule_run
    handover: float = 0.0  # outputs() CPU, DLPack, targets
    wait: float = 0.0  # wall time inside outputs(), and waiting for the host decoder
    epochs: int = 0  # epochs opened and handed to the runner
    open: float = 0.0  # CPU seconds opening them (plan and shard stream; mostly off the consuming thread)

    def reset(self) -> None:
        self.__init__()


class Runner:
    def __init__(
        self,
        augment: AugmentSpec,
        layout: Layout,
        engine: EngineSpec,
        *,
        batch_size: int,
        pipelines: int,
        threads_per_pipeline: int,
        device_id: int | None,
        depth: int,
        seed: int,
        on_error: str,
        stage: StageParams,
        first_slot: int = 0,
        global_batch: int | None = None,
    ) -> None:
        """first_slot, global_batch: this rank's batch is slots [first_slot, first_slot + batch_size) of a
        global batch of `global_batch` samples (default: batch_size, a single rank)."""
        self.augment, self.layout, self.engine = augment, layout, engine
        self.batch_size, self.depth, self.seed, self.on_error = batch_size, depth, seed, on_error
        self.device_id, self.threads_per_pipeline = device_id, threads_per_pipeline
        self.slots = slice(first_slot, first_slot + batch_size)
        self.global_batch = global_batch or batch_size
        self.stage = stage
        self.names = input_names(augment, layout)
        self.host = HostDecoder(pipelines * threads_per_pipeline) if layout.host_decode else None
        self.pipes = [self._build(k) for k in range(pipelines)]
        self.feeders = [Feeder(pipe) for pipe in self.pipes]
        self.queues: list[deque[Flight]] = [deque() for _ in self.pipes]
        # DALI's first schedule_run prefetches `depth` iterations, so a pipeline's first
        # `depth` batches must all be fed before it; afterwards each schedule_run runs one.
        self._primed = [False] * len(self.pipes)
        self.skipped = 0  # samples replaced under on_error="skip"
        self.faults: list[str] = []  # descriptions of the first faults seen (bounded)
        self.refed = 0  # batches fed again after a stage change
        self.rebuilt = 0  # pipelines rebuilt on the fault path
        self.retried_closed = 0  # transient errors retried by streams already closed
        self.reader_cpu_closed = 0.0
        self.bad: dict[tuple[str, str], str] = {}  # (shard, key) -> reason: samples DALI could not decode
        self.current: Epoch | None = None
        self.ahead: list[Epoch] = []  # the next epochs in order, handed over early by the Loader (training only)
        self.stats = Stats()
        self.keep = KeepAlive() if layout.gpu else None
        self._next_pull = 0  # batch index in the current epoch
        self._seq = 0  # next feed number
        self._broken: str | None = None
        self._probe = None

    @property
    def hflip_prob(self) -> float:
        return self.augment.hflip_prob

    def _build(self, k: int):
        return build_pipeline(self.augment, self.layout, self.engine, batch_size=self.batch_size,
                              num_threads=self.threads_per_pipeline, device_id=self.device_id, depth=self.depth,
                              seed=self.seed + k)

    # ------------------------------------------------------------------ control (the Loader's epochs)
    def begin(self, epoch: Epoch) -> None:
        """Make `epoch` current, starting at its `next_feed`; every flight and open epoch before is dropped."""
        self._drop_flights(None)
        for old in self._open():
            self._close(old)
        self.current, self.ahead = epoch, []
        self._next_pull = epoch.next_feed
        self._count(epoch)

    def promote(self) -> None:
        """Make the first epoch handed over early current, at its batch 0 (its first batches are in flight)."""
        assert self.ahead and self.current is not None
        self._drop_flights(self.current)  # batches of the old epoch nobody pulled
        self._close(self.current)
        self.current = self.ahead.pop(0)
        self._next_pull = 0

    @property
    def wanted_epoch(self) -> int | None:
        """Training: the number of the epoch to hand over next, once every batch of the open epochs is
        fed and the next pipeline has room for more; else None."""
        if not self.layout.train or self.current is None:
            return None
        last = self.ahead[-1] if self.ahead else self.current
        if last.next_feed < last.plan.num_batches or len(self.queues[self._seq % len(self.pipes)]) >= self.depth:
            return None
        return last.number + 1

    def set_ahead(self, epoch: Epoch) -> None:
        self.ahead.append(epoch)
        self._count(epoch)
        self._fill()

    def _count(self, epoch: Epoch) -> None:
        self.stats.epochs += 1
        self.stats.open += epoch.open_s

    def set_stage(self, stage: StageParams) -> None:
        """Eval pipelines use only the image size; train pipelines check the RandAugment layers built."""
        layers = self.augment.randaug_layers or 0
        if self.layout.train and stage.randaug_ops > layers and stage.randaugment_on:
            raise ValueError(
                f"stage asks for {stage.randaug_ops} RandAugment ops but the pipeline was built with "
                f"{layers} layers; pass AugmentSpec(randaug_layers>={stage.randaug_ops}) to Loader"
            )
        self.stage = stage

    def pull(self) -> tuple[torch.Tensor, Flight]:
        """The next batch of the current epoch: (images as a torch tensor, its flight)."""
        if self._broken:
            raise LoaderError(f"the loader stopped after an earlier failure: {self._broken}")
        if any(f.stage is not self.stage and f.stage != self.stage for q in self.queues for f in q if not f.dummy):
            self._refeed_with_current_stage()
        self._fill()
        flight = self._front()
        assert flight.epoch is self.current and flight.batch == self._next_pull, (flight.batch, self._next_pull)
        images = self._take(flight)
        self._next_pull += 1
        if flight.faults:
            self._report_faults(flight)
        self._fill()
        for p in range(len(self.pipes)):
            self._push(p, block=False)  # hand DALI every batch the host has finished, before the caller's step
        return images, flight

    @property
    def retried(self) -> int:
        return self.retried_closed + sum(e.stream.retried for e in self._open())

    @property
    def reader_cpu(self) -> float:
        """CPU seconds spent in shard-reader threads so far."""
        return self.reader_cpu_closed + sum(e.stream.cpu_s for e in self._open())

    def close(self) -> None:
        self._drop_flights(None)
        for epoch in self._open():
            self._close(epoch)
        self.current, self.ahead = None, []
        if self.keep is not None:
            self.keep.clear()
        self.pipes.clear()
        self.feeders.clear()
        self._probe = None
        if self.host is not None:
            self.host.close()

    # ------------------------------------------------------------------ flights
    def _front(self) -> Flight:
        """The oldest real flight, dropping any priming copies ahead of it."""
        while True:
            pipes = [p for p, q in enumerate(self.queues) if q]
            p = min(pipes, key=lambda k: self.queues[k][0].seq)
            self._prime(p)
            flight = self.queues[p][0]
            if not flight.dummy:
                return flight
            self._discard(p)

    def _prime(self, p: int) -> None:
        """Start pipeline p's first prefetch now, padding with copies if it has fewer than `depth` batches."""
        queue = self.queues[p]
        while not self._primed[p] and queue:
            self._push(p, block=True)
            if self._primed[p]:
                break
            last = queue[-1]
            self._feed(Flight(last.seq, last.epoch, last.batch, last.stage, last.items, last.real, last.got,
                              dummy=True))

    def _discard(self, p: int) -> Flight:
        self._prime(p)
        flight = self.queues[p].popleft()
        if not flight.fed:
            return flight  # still on the host decoder: DALI never saw it
        try:
            self.pipes[p].outputs()
        except RuntimeError:
            # A discarded batch's failure does not matter, but DALI's pipeline object is invalid now:
            # rebuild it and feed it the flights it still had (a failing sample is found when its batch runs).
            self._reset_pipe(p)
        return flight

    def _drop_flights(self, epoch: Epoch | None) -> list[Flight]:
        """Drain (in feed order) the flights of `epoch`, or all when None; returns the real ones."""
        dropped = []
        while any(q and (epoch is None or q[0].epoch is epoch) for q in self.queues):
            p = min((k for k, q in enumerate(self.queues) if q and (epoch is None or q[0].epoch is epoch)),
                    key=lambda k: self.queues[k][0].seq)
            dropped.append(self._discard(p))
        return [f for f in dropped if not f.dummy]

    def _refeed_with_current_stage(self) -> None:
        for flight in sorted(self._drop_flights(None), key=lambda f: f.seq):
            flight.stage = self.stage
            self._feed(flight)
            self.refed += 1

    def _open(self) -> list[Epoch]:
        """The current epoch and those handed over early, in order."""
        return ([self.current] if self.current is not None else []) + self.ahead

    def _fill(self) -> None:
        assert self.current is not None
        while True:
            # training: the Loader hands the next epochs over when asked (`wanted_epoch`)
            epoch = next((e for e in self._open() if e.next_feed < e.plan.num_batches), None)
            if epoch is None:
                return
            if len(self.queues[self._seq % len(self.pipes)]) >= self.depth:
                return
            read_ahead = epoch.next_feed + len(self.pipes) * self.depth + 2  # batches
            epoch.stream.advance(read_ahead * self.batch_size)
            flight = self._assemble(epoch, epoch.next_feed)
            epoch.next_feed += 1
            self._seq += 1
            self._feed(flight)

    def _close(self, epoch: Epoch) -> None:
        epoch.stream.close()
        self.retried_closed += epoch.stream.retried
        self.reader_cpu_closed += epoch.stream.cpu_s

    # ------------------------------------------------------------------ one batch
    def _assemble(self, epoch: Epoch, b: int) -> Flight:
        """Batch b's samples, faulty ones replaced by good ones of the batch (faults are reported on pull)."""
        start = time.thread_time()
        plan, stream, bs = epoch.plan, epoch.stream, self.batch_size
        rows = slice(b * bs, (b + 1) * bs)
        real = plan.real[rows]
        order = plan.order[rows].tolist()
        if real.all():
            got: list[Item | Fault | None] = stream.take_many(order)
        else:
            got = [stream.take(i) if r else None for i, r in zip(order, real)]
        if self.bad:
            got = [Fault(g.shard, g.key, self.bad[(g.shard, g.key)]) if isinstance(g, Item)
                   and (g.shard, g.key) in self.bad else g for g in got]
        flight = Flight(self._seq, epoch, b, self.stage, [], real, got)
        self._substitute(flight)
        self.stats.assemble += time.thread_time() - start
        return flight

    def _substitute(self, flight: Flight) -> None:
        """flight.items from flight.got: each fault replaced by a good sample of the batch (k-th fault: k-th good)."""
        got, epoch, b = flight.got, flight.epoch, flight.batch
        faults = [g for g in got if isinstance(g, Fault)]
        good = [g for g in got if isinstance(g, Item)]
        if good:
            epoch.pad = good[-1]
        elif epoch.pad is None and not flight.real.all():
            first = epoch.stream.read_now(0)  # eval padding with no real sample at hand (resumed in the padded tail)
            if isinstance(first, Fault):
                raise LoaderError(f"cannot read a sample to pad eval batch {b}: {first.describe()}")
            epoch.pad = first
        if not good and flight.real.any():
            raise LoaderError(f"every sample of batch {b} (epoch {epoch.number}) failed, nothing to substitute; "
                              f"first: {faults[0].describe()}")
        spare = good or [epoch.pad]
        flight.items = [g if isinstance(g, Item) else spare[k % len(spare)] for k, g in enumerate(got)]
        flight.faults = faults

    def _report_faults(self, flight: Flight) -> None:
        faults, b = flight.faults, flight.batch
        if self.on_error == "raise":
            more = f" (and {len(faults) - 1} more in this batch)" if len(faults) > 1 else ""
            self._broken = f"{faults[0].describe()}{more}"
            raise LoaderError(f"{self._broken}; pass on_error='skip' to skip and count such samples")
        self.skipped += len(faults)
        fresh = [f.describe() for f in faults if f.describe() not in self.faults]
        if fresh and len(self.faults) < MAX_FAULTS_KEPT:
            self.faults.extend(fresh[: MAX_FAULTS_KEPT - len(self.faults)])
            warnings.warn(
                f"skipping {len(faults)} sample(s) in batch {b} (epoch {flight.epoch.number}), replaced by other "
                f"samples of the batch; {self.skipped} skipped so far; first: {faults[0].describe()}",
                RuntimeWarning,
                stacklevel=4,
            )

    def _feed(self, flight: Flight) -> None:
        """Draw the flight's inputs and queue it; hand it to its pipeline now, or once the host has decoded it."""
        self._draw(flight)
        p = flight.seq % len(self.pipes)
        flight.fed = False
        self.queues[p].append(flight)
        if flight.decoding is None:
            self._hand(p, flight)
        else:
            self._push(p, block=False)

    def _draw(self, flight: Flight) -> None:
        start = time.thread_time()
        flight.drawn = draw_batch(flight.items, augment=self.augment, layout=self.layout, stage=flight.stage,
                                  seed=self.seed, epoch=flight.epoch.number, step=flight.batch, slots=self.slots,
                                  global_batch=self.global_batch)
        drawn = time.thread_time()
        self.stats.draw += drawn - start
        if self.host is not None:
            flight.decoding = self.host.submit([it.jpg for it in flight.items], flight.drawn.regions,
                                               flight.stage.image_size)
            self.stats.feed += time.thread_time() - drawn

    def _hand(self, p: int, flight: Flight) -> None:
        """feed_input and schedule_run for a flight already queued on pipeline p (the queue's first unfed one)."""
        start = time.thread_time()
        pipe = self.pipes[p]
        self.feeders[p](self.names, flight.drawn.inputs)
        flight.fed = True
        if self._primed[p]:
            pipe.schedule_run()
        elif sum(f.fed for f in self.queues[p]) == self.depth:
            pipe.schedule_run()  # runs all `depth` fed batches
            self._primed[p] = True
        self.stats.feed += time.thread_time() - start

    def _push(self, p: int, *, block: bool, until: Flight | None = None) -> None:
        """Host decode: hand pipeline p its queued flights in order, as far as their images are ready
        (block: waiting for them, up to `until` or to the end of the queue)."""
        for flight in list(self.queues[p]):
            if flight.fed:
                continue
            if not block and not flight.decoding.done():
                return
            wall = time.perf_counter()
            self._decoded(flight)
            self.stats.wait += time.perf_counter() - wall
            self._hand(p, flight)
            if flight is until:
                return

    def _decoded(self, flight: Flight) -> None:
        """The flight's host-decoded images as its "img" input; undecodable samples replaced as faults are."""
        for _ in range(MAX_RECOVERIES + 1):
            images, failed = flight.decoding.result()
            if not failed:
                flight.drawn.inputs["img"] = images
                return
            for i, reason in failed.items():
                item = flight.items[i]
                self.bad[(item.shard, item.key)] = reason
                for j, got in enumerate(flight.got):  # where the sample was read (it may stand in for another)
                    if got is item:
                        flight.got[j] = Fault(item.shard, item.key, reason)
            self._substitute(flight)  # raises when nothing good is left
            self._draw(flight)  # the same draws for the replaced samples' own sizes
        raise LoaderError(f"batch {flight.batch} (epoch {flight.epoch.number}): the host decoder kept failing "
                          f"after {MAX_RECOVERIES} replacements")

    def _take(self, flight: Flight) -> torch.Tensor:
        """Pop `flight` (the front of its pipeline) and hand its output over; the fault path on a DALI failure."""
        for attempt in range(MAX_RECOVERIES + 1):
            p = flight.seq % len(self.pipes)
            self._prime(p)
            self._push(p, block=True, until=flight)
            assert self.queues[p][0] is flight
            self.queues[p].popleft()
            wall, cpu = time.perf_counter(), time.thread_time()
            stream = torch.cuda.current_stream(self.device_id) if self.layout.gpu else None
            try:
                (out,) = self.pipes[p].outputs(cuda_stream=stream) if stream is not None else self.pipes[p].outputs()
            except RuntimeError as exc:
                self.stats.wait += time.perf_counter() - wall
                self._recover(p, flight, exc, attempt)
                continue
            self.stats.wait += time.perf_counter() - wall
            images = to_torch(out, gpu=self.layout.gpu, channels_last=self.augment.channels_last)
            if self.keep is not None:
                self.keep.hold(out, stream)
            self.stats.handover += time.thread_time() - cpu
            self.stats.batches += 1
            return images
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ the fault path
    def _reset_pipe(self, p: int, first: Flight | None = None) -> None:
        """A new pipeline p, fed again with `first` and then the real flights it still held (same order)."""
        lost = [f for f in self.queues[p] if not f.dummy]
        self.queues[p].clear()
        self.pipes[p] = None  # release the failed pipeline's threads and buffers before building the next
        self.pipes[p] = self._build(p)
        self.feeders[p] = Feeder(self.pipes[p])
        self._primed[p] = False
        self.rebuilt += 1
        for flight in ([first] if first is not None else []) + lost:
            self._feed(flight)

    def _recover(self, p: int, flight: Flight, exc: RuntimeError, attempt: int) -> None:
        message = _last_line(exc)
        where = f"batch {flight.batch} (epoch {flight.epoch.number})"
        if attempt >= MAX_RECOVERIES:
            self._broken = f"DALI failed on {where} {attempt + 1} times: {message}"
            raise LoaderError(self._broken) from exc
        # host decode: the decoder's failures never reach DALI (`_decoded`), so no sample is to blame here
        bad = [] if self.layout.host_decode else self._find_undecodable(flight)
        if not bad and attempt > 0:
            keys = sorted({f"{it.shard}: {it.key!r}" for it in flight.items})[:4]
            self._broken = (f"DALI failed on {where} and no single sample of it fails to decode alone "
                            f"(first samples: {keys}): {message}")
            raise LoaderError(self._broken) from exc
        for i in bad:
            item = flight.items[i]
            reason = f"DALI's decoder fails on it ({message}; its header was readable, its data is not)"
            self.bad[(item.shard, item.key)] = reason
            flight.got[i] = Fault(item.shard, item.key, reason)
        if bad and self.on_error == "raise":
            first = flight.got[bad[0]]
            assert isinstance(first, Fault)
            self._broken = first.describe()
            raise LoaderError(f"{self._broken}; pass on_error='skip' to skip and count such samples") from exc
        if bad:
            self._substitute(flight)  # raises when nothing good is left
        self._reset_pipe(p, first=flight)

    def _find_undecodable(self, flight: Flight) -> list[int]:
        """Indices of the flight's samples the decoder fails on alone, by bisection with a decode-only pipeline."""
        drawn = flight.drawn
        assert drawn is not None
        jpgs = drawn.inputs["jpg"]
        windows = drawn.inputs.get("window")
        bad: list[int] = []
        groups = [list(range(len(jpgs)))]
        while groups:
            group = groups.pop()
            if self._decodes(jpgs, windows, group):
                continue
            if len(group) == 1:
                bad.append(group[0])
                continue
            half = len(group) // 2
            groups += [group[half:], group[:half]]
        return sorted(bad)

    def _decodes(self, jpgs: list, windows, rows: list[int]) -> bool:
        if self._probe is None:
            self._probe = build_probe(self.layout, self.engine, batch_size=self.batch_size, device_id=self.device_id)
        probe = self._probe
        probe.feed_input("jpg", [jpgs[i] for i in rows])
        if windows is not None:
            probe.feed_input("window", np.ascontiguousarray(windows[rows]))
        try:
            probe.run()
            return True
        except RuntimeError:
            self._probe = None  # invalid now; the next probe builds a fresh one
            return False


def _last_line(exc: BaseException) -> str:
    """DALI's own words from a pipeline error (its last informative line, e.g. 'Failed to decode sample #3')."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    useful = [line for line in lines if "no longer valid" not in line and not line.startswith("C++ context")]
    return (useful or lines or [repr(exc)])[-1].rstrip(" :")
