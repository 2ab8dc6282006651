"""Driving the built DALI pipelines: batch assembly, feeding, round-robin, exact stage changes.

The epochs and the position in them belong to `Epochs` (loaders/epochs.py); what a bad sample
becomes to `Faults` (loaders/faults.py). The runner assembles, feeds and pulls.

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
`top_up` has `Epochs` hand over e + 1; its first batches keep the pipelines fed. Epochs
shorter than the pipelines' depth (a small split, one batch an epoch) are handed over
several at once, so the pipelines stay as full as within an epoch. If the caller then
starts e + 1 at batch 0, its batches in flight are used.

Host decode (the CPU default, loaders/hostdecode.py): a flight is queued on its pipeline when
drawn, its crops go to the decoder's threads, and it is fed to DALI once they are done, in
queue order (`_push`: without waiting after each pull and feed; waiting when DALI must run
it next). A sample the host decoder fails on is replaced there like a reader fault; the
batch is drawn again for the replacements and DALI never sees the bad one.

A batch DALI fails on (a JPEG whose entropy data is corrupt behind a valid header; DALI's
pipeline object is invalid afterwards) takes the fault path: `Faults.diagnose` finds and
replaces the samples to blame (or raises), the pipeline is rebuilt and the batch run again.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from stagewise.loaders.epochs import Epoch, Epochs
from stagewise.loaders.faults import MAX_RECOVERIES, Faults
from stagewise.loaders.feed import Drawn, Feeder, draw_batch
from stagewise.loaders.graph import Layout, build_pipeline, input_names
from stagewise.loaders.handover import KeepAlive, to_torch
from stagewise.loaders.hostdecode import Decoding, HostDecoder
from stagewise.loaders.inputs import IMG
from stagewise.loaders.params import StageParams
from stagewise.loaders.shard_stream import Fault, Item, LoaderError
from stagewise.loaders.spec import AugmentSpec, EngineSpec


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
        faults: Faults,
        epochs: Epochs,
        stats: Stats,
        stage: StageParams,
        first_slot: int = 0,
        global_batch: int | None = None,
    ) -> None:
        """first_slot, global_batch: this rank's batch is slots [first_slot, first_slot + batch_size) of a
        global batch of `global_batch` samples (default: batch_size, a single rank)."""
        self.augment, self.layout, self.engine = augment, layout, engine
        self.batch_size, self.depth, self.seed = batch_size, depth, seed
        self.faults, self.epochs, self.stats = faults, epochs, stats
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
        self.refed = 0  # batches fed again after a stage change
        self.rebuilt = 0  # pipelines rebuilt on the fault path
        self.keep = KeepAlive() if layout.gpu else None
        self._seq = 0  # next feed number

    @property
    def hflip_prob(self) -> float:
        return self.augment.hflip_prob

    def _build(self, k: int):
        return build_pipeline(self.augment, self.layout, self.engine, batch_size=self.batch_size,
                              num_threads=self.threads_per_pipeline, device_id=self.device_id, depth=self.depth,
                              seed=self.seed + k)

    # ------------------------------------------------------------------ control
    def top_up(self) -> None:
        """Training: hand the pipelines the next epochs while every open one is fed and a pipeline has room."""
        while self.epochs.wanted() is not None and len(self.queues[self._seq % len(self.pipes)]) < self.depth:
            self.epochs.add_ahead(self.epochs.wanted())
            self._fill()

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
        self.faults.check()
        if any(f.stage is not self.stage and f.stage != self.stage for q in self.queues for f in q if not f.dummy):
            self._refeed_with_current_stage()
        self._fill()
        flight = self._front()
        position = self.epochs.position
        assert flight.epoch is self.epochs.current and flight.batch == position, (flight.batch, position)
        images = self._take(flight)
        if flight.faults:
            self.faults.report(flight)
        self._fill()
        for p in range(len(self.pipes)):
            self._push(p, block=False)  # hand DALI every batch the host has finished, before the caller's step
        return images, flight

    def close(self) -> None:
        self.drop_flights(None)
        if self.keep is not None:
            self.keep.clear()
        self.pipes.clear()
        self.feeders.clear()
        self.faults.close()
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

    def drop_flights(self, epoch: Epoch | None) -> list[Flight]:
        """Drain (in feed order) the flights of `epoch`, or all when None; returns the real ones
        (`Epochs.start` drops them when the current epoch changes)."""
        dropped = []
        while any(q and (epoch is None or q[0].epoch is epoch) for q in self.queues):
            p = min((k for k, q in enumerate(self.queues) if q and (epoch is None or q[0].epoch is epoch)),
                    key=lambda k: self.queues[k][0].seq)
            dropped.append(self._discard(p))
        return [f for f in dropped if not f.dummy]

    def _refeed_with_current_stage(self) -> None:
        for flight in sorted(self.drop_flights(None), key=lambda f: f.seq):
            flight.stage = self.stage
            self._feed(flight)
            self.refed += 1

    def _fill(self) -> None:
        assert self.epochs.current is not None
        while True:
            epoch = self.epochs.feedable()  # training: the next epochs are handed over by `top_up`
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
        flight = Flight(self._seq, epoch, b, self.stage, [], real, self.faults.known(got))
        self.faults.substitute(flight)
        self.stats.assemble += time.thread_time() - start
        return flight

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
                flight.drawn.inputs[IMG] = images
                return
            self.faults.mark(flight, failed)  # raises when nothing good is left
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
                self.faults.diagnose(flight, exc, attempt)  # raises when it must stop
                self._reset_pipe(p, first=flight)
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
