"""Driving the built DALI pipelines: batch assembly, feeding, round-robin, exact stage changes.

Batches are fed in one global sequence; feed number s goes to pipeline s % P (on CPU,
P independent 1-thread pipelines: DALI runs a pipeline's CPU operators one after
another and RandAugment's per-sample branches leave threads idle, so 2 pipelines x 1
thread beat 1 x 2 on 2 cores; see docs/loader.md). Each pipeline holds up to `depth`
batches in flight.

Everything random about batch b of epoch e (crop windows, flips, RandAugment draws,
mixup) comes from generators seeded with (seed, e, b, stream), so a batch is a pure
function of (seed, e, b, stage), whichever pipeline runs it and whenever.

Stage changes: batches already in flight were fed with the old stage. When the
consumer pulls the next batch after `set_stage`, they are drained, discarded and fed
again with the new stage (same samples), so the change takes effect from the very
next batch pulled, at the cost of re-running at most P x depth batches.

Epoch boundaries (training): once the last batch of epoch e is fed, the runner opens
epoch e + 1 (its plan and reader) and keeps the pipelines fed with its first batches.
If the caller then starts epoch e + 1 at batch 0, those batches are used; otherwise
they are dropped. The pipelines never idle between epochs.
"""
from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from stagewise.loaders.crop import center_crop, random_resized_crop
from stagewise.loaders.mixup import MIX_STREAM, MixParams, draw_mix, feed_mix
from stagewise.loaders.params import StageParams
from stagewise.loaders.graph import GraphSpec, build_pipeline
from stagewise.loaders.plan import EpochPlan
from stagewise.loaders.randaugment import feed_slot, sample_slots
from stagewise.loaders.shard_stream import Fault, Item, LoaderError, SampleReader

CROP_STREAM, FLIP_STREAM, RANDAUG_STREAM = 1, 2, 3  # generator stream ids per batch (MIX_STREAM = 4)


def batch_rng(seed: int, epoch: int, batch: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, batch, stream])


@dataclass
class Epoch:
    number: int
    plan: EpochPlan
    reader: SampleReader
    next_feed: int  # next batch index to assemble and feed
    pad: Item | None = None  # eval padding material


@dataclass
class Flight:
    seq: int  # feed number: runs on pipeline seq % P
    epoch: Epoch
    batch: int
    stage: StageParams
    items: list[Item]  # as fed (faulty samples already replaced), kept to re-feed after a stage change
    real: np.ndarray  # bool [N]: False marks eval padding
    mix: MixParams | None = None  # as fed, for the targets
    dummy: bool = False  # a copy fed only to complete a pipeline's first prefetch; never yielded
    faults: list[Fault] = field(default_factory=list)  # samples replaced; reported when the batch is pulled


class Runner:
    def __init__(
        self,
        spec: GraphSpec,
        *,
        batch_size: int,
        pipelines: int,
        threads_per_pipeline: int,
        device_id: int | None,
        depth: int,
        seed: int,
        scale: tuple[float, float],
        ratio: tuple[float, float],
        hflip_prob: float,
        crop_pct: float,
        on_error: str,
        stage: StageParams,
        open_epoch: Callable[[int, int], Epoch],
    ) -> None:
        self.spec, self.batch_size, self.depth, self.seed = spec, batch_size, depth, seed
        self.scale, self.ratio, self.crop_pct, self.on_error = scale, ratio, crop_pct, on_error
        self.hflip_prob = hflip_prob  # train: chance per sample of a left-right mirror
        self.stage, self.open_epoch = stage, open_epoch
        self.pipes = [
            build_pipeline(spec, batch_size=batch_size, num_threads=threads_per_pipeline, device_id=device_id,
                           depth=depth, seed=seed + k)
            for k in range(pipelines)
        ]
        self.queues: list[deque[Flight]] = [deque() for _ in self.pipes]
        # DALI's first schedule_run prefetches `depth` iterations, so a pipeline's first
        # `depth` batches must all be fed before it; afterwards each schedule_run runs one.
        self._primed = [False] * len(self.pipes)
        self.skipped = 0  # samples replaced under on_error="skip"
        self.faults: list[str] = []  # descriptions of the first faults seen (bounded)
        self.refed = 0  # batches fed again after a stage change
        self.retried_closed = 0  # transient errors retried by readers already closed
        self.current: Epoch | None = None
        self.ahead: Epoch | None = None  # the next epoch, opened early (training only)
        self._next_pull = 0  # batch index in the current epoch
        self._seq = 0  # next feed number
        self._broken: str | None = None

    # ------------------------------------------------------------------ control
    def begin_epoch(self, number: int, first_batch: int) -> None:
        ahead = self.ahead
        if ahead is not None and ahead.number == number and first_batch == 0 and self.current is not None:
            self._drop_flights(self.current)  # batches of the old epoch nobody pulled
            self._close(self.current)
            self.current, self.ahead = ahead, None
        else:
            self._drop_flights(None)
            for epoch in (self.current, self.ahead):
                if epoch is not None:
                    self._close(epoch)
            self.current, self.ahead = self.open_epoch(number, first_batch), None
        self._next_pull = first_batch

    def set_stage(self, stage: StageParams) -> None:
        """Eval pipelines use only the image size; train pipelines check the RandAugment layers built."""
        if self.spec.train and stage.randaug_ops > self.spec.layers and stage.randaugment_on:
            raise ValueError(
                f"stage asks for {stage.randaug_ops} RandAugment ops but the pipeline was built with "
                f"{self.spec.layers} layers; pass randaug_layers>={stage.randaug_ops} to Loader"
            )
        self.stage = stage

    def pull(self) -> tuple[torch.Tensor, Flight]:
        """The next batch of the current epoch: (images as a torch tensor, its flight)."""
        if self._broken:
            raise LoaderError(f"the loader stopped after an earlier failure: {self._broken}")
        if any(f.stage != self.stage for q in self.queues for f in q if not f.dummy):
            self._refeed_with_current_stage()
        self._fill()
        flight = self._front()
        assert flight.epoch is self.current and flight.batch == self._next_pull, (flight.batch, self._next_pull)
        images = self._outputs(flight)
        self._next_pull += 1
        if flight.faults:
            self._report_faults(flight)
        self._fill()
        return images, flight

    @property
    def retried(self) -> int:
        return self.retried_closed + sum(e.reader.retried for e in (self.current, self.ahead) if e is not None)

    def close(self) -> None:
        self._drop_flights(None)
        for epoch in (self.current, self.ahead):
            if epoch is not None:
                self._close(epoch)
        self.current = self.ahead = None
        self.pipes.clear()

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
            last = queue[-1]
            self._feed(Flight(last.seq, last.epoch, last.batch, last.stage, last.items, last.real, dummy=True))

    def _discard(self, p: int) -> Flight:
        self._prime(p)
        flight = self.queues[p].popleft()
        try:
            self.pipes[p].outputs()
        except RuntimeError:
            pass  # a discarded batch's failure does not matter
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

    def _fill(self) -> None:
        while True:
            epoch = self.current
            assert epoch is not None
            if epoch.next_feed >= epoch.plan.num_batches:
                if not self.spec.train:
                    return
                if self.ahead is None:  # open the next epoch now: the pipelines never idle at the boundary
                    self.ahead = self.open_epoch(epoch.number + 1, 0)
                epoch = self.ahead
                if epoch.next_feed >= epoch.plan.num_batches:
                    return
            if len(self.queues[self._seq % len(self.pipes)]) >= self.depth:
                return
            read_ahead = epoch.next_feed + len(self.pipes) * self.depth + 2  # batches
            epoch.reader.advance(read_ahead * self.batch_size)
            flight = self._assemble(epoch, epoch.next_feed)
            epoch.next_feed += 1
            self._seq += 1
            self._feed(flight)

    def _close(self, epoch: Epoch) -> None:
        epoch.reader.close()
        self.retried_closed += epoch.reader.retried

    # ------------------------------------------------------------------ one batch
    def _assemble(self, epoch: Epoch, b: int) -> Flight:
        """Batch b's samples, faulty ones replaced by good ones of the batch (faults are reported on pull)."""
        plan, reader, bs = epoch.plan, epoch.reader, self.batch_size
        rows = slice(b * bs, (b + 1) * bs)
        real = plan.real[rows]
        got: list[Item | Fault | None] = [reader.take(int(i)) if r else None for i, r in zip(plan.order[rows], real)]
        faults = [g for g in got if isinstance(g, Fault)]
        good = [g for g in got if isinstance(g, Item)]
        if good:
            epoch.pad = good[-1]
        elif epoch.pad is None and not real.all():
            first = reader.read_now(0)  # eval padding with no real sample at hand (resumed in the padded tail)
            if isinstance(first, Fault):
                raise LoaderError(f"cannot read a sample to pad eval batch {b}: {first.describe()}")
            epoch.pad = first
        if not good and real.any():
            raise LoaderError(f"every sample of batch {b} (epoch {epoch.number}) failed, nothing to substitute; "
                              f"first: {faults[0].describe()}")
        spare = good or [epoch.pad]
        items = [g if isinstance(g, Item) else spare[k % len(spare)] for k, g in enumerate(got)]
        return Flight(self._seq, epoch, b, self.stage, items, real, faults=faults)

    def _report_faults(self, flight: Flight) -> None:
        faults, b = flight.faults, flight.batch
        if self.on_error == "raise":
            more = f" (and {len(faults) - 1} more in this batch)" if len(faults) > 1 else ""
            self._broken = f"{faults[0].describe()}{more}"
            raise LoaderError(f"{self._broken}; pass on_error='skip' to skip and count such samples")
        self.skipped += len(faults)
        fresh = [f.describe() for f in faults if f.describe() not in self.faults]
        if fresh and len(self.faults) < 100:
            self.faults.extend(fresh[: 100 - len(self.faults)])
            warnings.warn(
                f"skipping {len(faults)} sample(s) in batch {b} (epoch {flight.epoch.number}), replaced by other "
                f"samples of the batch; {self.skipped} skipped so far; first: {faults[0].describe()}",
                RuntimeWarning,
                stacklevel=4,
            )

    def _feed(self, flight: Flight) -> None:
        stage, items, n, b, e = flight.stage, flight.items, len(flight.items), flight.batch, flight.epoch.number
        size = stage.image_size
        sizes = np.array([(it.height, it.width) for it in items], np.int64)
        if self.spec.train:
            windows = random_resized_crop(batch_rng(self.seed, e, b, CROP_STREAM), sizes, self.scale, self.ratio)
        else:
            windows = center_crop(sizes, size, self.crop_pct)
        p = flight.seq % len(self.pipes)
        pipe = self.pipes[p]
        pipe.feed_input("jpg", [np.frombuffer(it.jpg, np.uint8) for it in items])
        pipe.feed_input("window", windows)
        pipe.feed_input("size", np.full((n, 2), size, np.float32))
        if self.spec.train:
            # Uniform draws in [0, 1) from the batch's own stream: 0 never mirrors, 1 always does, and the
            # default 0.5 gives the same flags as before the option existed (checkpoints resume bit-exactly).
            flips = batch_rng(self.seed, e, b, FLIP_STREAM).random(n) < self.hflip_prob
            pipe.feed_input("flip", flips.astype(np.int32))
            if self.spec.layers:
                rng = batch_rng(self.seed, e, b, RANDAUG_STREAM)
                slots = sample_slots(rng, n, self.spec.layers, stage.randaug_ops, stage.randaug_magnitude, size,
                                     self.spec.randaug)
                for k, params in enumerate(slots):
                    feed_slot(pipe, k, params)
            flight.mix = draw_mix(batch_rng(self.seed, e, b, MIX_STREAM), n, size, stage)
            feed_mix(pipe, flight.mix, n, size)
        self.queues[p].append(flight)
        if self._primed[p]:
            pipe.schedule_run()
        elif len(self.queues[p]) == self.depth:
            pipe.schedule_run()  # runs all `depth` fed batches
            self._primed[p] = True

    def _outputs(self, flight: Flight) -> torch.Tensor:
        p = flight.seq % len(self.pipes)
        self.queues[p].popleft()
        try:
            (out,) = self.pipes[p].outputs()
        except RuntimeError as exc:
            shards = sorted({it.shard for it in flight.items})
            keys = [it.key for it in flight.items][:8]
            message = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
            self._broken = (f"DALI failed on batch {flight.batch} (epoch {flight.epoch.number}; samples {keys}... "
                            f"from {shards}): {message}")
            raise LoaderError(self._broken) from exc
        return _to_torch(out, self.spec.gpu, self.spec.channels_last)


def _to_torch(out, gpu: bool, channels_last: bool) -> torch.Tensor:
    """A uniform-shape DALI batch as a torch tensor.

    CPU: zero-copy through DLPack. DALI's dynamic executor (the default since DALI 2.0)
    gives each iteration its own output buffer, kept alive by the returned object, so
    nothing overwrites it; a copy cost ~0.1-0.6 core-ms per 224 px image.
    GPU: copied into a torch-allocated tensor on the current stream (the path DALI's
    own iterator uses; zero-copy there awaits a GPU to verify stream semantics).
    """
    dense = out.as_tensor()
    if gpu:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        target = torch.empty(tuple(dense.shape()), dtype=torch.float32,
                             device=torch.device("cuda", torch.cuda.current_device()))
        feed_ndarray(dense, target, cuda_stream=torch.cuda.current_stream())
    else:
        target = torch.from_dlpack(dense)
    if channels_last:  # NHWC from DALI: an NCHW view with channels_last strides
        target = target.permute(0, 3, 1, 2)
    return target
