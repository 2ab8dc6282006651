"""What a bad sample becomes: replaced within its batch and counted, or one error naming shard and key.

Faults reach a batch three ways, each handled here and driven by the runner (loaders/runner.py):
- the shard stream reports it (`Fault`: a missing shard, a sample without jpg, a decompression bomb...);
- the host decoder fails on it (`mark`);
- DALI fails on the batch (a JPEG whose entropy data is corrupt behind a valid header): `diagnose`
  bisects the batch with a decode-only probe pipeline to find the samples that fail alone.
A sample found bad is remembered by (shard, key), so later epochs replace it before it is decoded.
Replacement (`substitute`): the k-th fault of a batch by its k-th good sample (the batch keeps its
size, so every rank still takes the same steps). Policy `on_error`: "raise" stops with the first
fault's description, "skip" counts and warns.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

from stagewise.loaders.graph import Layout, build_probe
from stagewise.loaders.inputs import JPG, WINDOW
from stagewise.loaders.shard_stream import Fault, Item, LoaderError
from stagewise.loaders.spec import EngineSpec

if TYPE_CHECKING:
    from stagewise.loaders.runner import Flight

MAX_FAULTS_KEPT = 100  # descriptions kept in `seen`
MAX_RECOVERIES = 4  # fault-path rounds for one batch before giving up


class Faults:
    def __init__(self, *, on_error: str, layout: Layout, engine: EngineSpec, batch_size: int,
                 device_id: int | None) -> None:
        self.on_error, self.layout, self.engine = on_error, layout, engine
        self.batch_size, self.device_id = batch_size, device_id
        self.skipped = 0  # samples replaced under on_error="skip"
        self.seen: list[str] = []  # descriptions of the first faults seen (bounded)
        self.bad: dict[tuple[str, str], str] = {}  # (shard, key) -> reason: samples a decoder could not decode
        self.broken: str | None = None  # why the loader stopped, once it has
        self._probe = None

    def check(self) -> None:
        if self.broken:
            raise LoaderError(f"the loader stopped after an earlier failure: {self.broken}")

    def known(self, got: list[Item | Fault | None]) -> list[Item | Fault | None]:
        """`got` with the samples already found undecodable turned into their faults."""
        if not self.bad:
            return got
        return [Fault(g.shard, g.key, self.bad[(g.shard, g.key)]) if isinstance(g, Item)
                and (g.shard, g.key) in self.bad else g for g in got]

    def substitute(self, flight: Flight) -> None:
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

    def report(self, flight: Flight) -> None:
        """When the batch is pulled: raise under "raise"; count and warn (new descriptions) under "skip"."""
        faults, b = flight.faults, flight.batch
        if self.on_error == "raise":
            more = f" (and {len(faults) - 1} more in this batch)" if len(faults) > 1 else ""
            self.broken = f"{faults[0].describe()}{more}"
            raise LoaderError(f"{self.broken}; pass on_error='skip' to skip and count such samples")
        self.skipped += len(faults)
        fresh = [f.describe() for f in faults if f.describe() not in self.seen]
        if fresh and len(self.seen) < MAX_FAULTS_KEPT:
            self.seen.extend(fresh[: MAX_FAULTS_KEPT - len(self.seen)])
            warnings.warn(
                f"skipping {len(faults)} sample(s) in batch {b} (epoch {flight.epoch.number}), replaced by other "
                f"samples of the batch; {self.skipped} skipped so far; first: {faults[0].describe()}",
                RuntimeWarning,
                stacklevel=4,
            )

    def mark(self, flight: Flight, failed: dict[int, str]) -> None:
        """The samples at `failed` (index -> reason) could not be decoded: remember them and replace them."""
        for i, reason in failed.items():
            item = flight.items[i]
            self.bad[(item.shard, item.key)] = reason
            for j, got in enumerate(flight.got):  # where the sample was read (it may stand in for another)
                if got is item:
                    flight.got[j] = Fault(item.shard, item.key, reason)
        self.substitute(flight)  # raises when nothing good is left

    def diagnose(self, flight: Flight, exc: RuntimeError, attempt: int) -> None:
        """DALI failed on `flight`: find the samples to blame and replace them, or raise when it must stop.
        The caller then rebuilds the pipeline and runs the batch again."""
        message = _last_line(exc)
        where = f"batch {flight.batch} (epoch {flight.epoch.number})"
        if attempt >= MAX_RECOVERIES:
            self.broken = f"DALI failed on {where} {attempt + 1} times: {message}"
            raise LoaderError(self.broken) from exc
        # host decode: the decoder's failures never reach DALI (`mark`), so no sample is to blame here
        bad = [] if self.layout.host_decode else self._undecodable(flight)
        if not bad and attempt > 0:
            keys = sorted({f"{it.shard}: {it.key!r}" for it in flight.items})[:4]
            self.broken = (f"DALI failed on {where} and no single sample of it fails to decode alone "
                           f"(first samples: {keys}): {message}")
            raise LoaderError(self.broken) from exc
        reason = f"DALI's decoder fails on it ({message}; its header was readable, its data is not)"
        if bad and self.on_error == "raise":
            item = flight.items[bad[0]]
            self.broken = Fault(item.shard, item.key, reason).describe()
            raise LoaderError(f"{self.broken}; pass on_error='skip' to skip and count such samples") from exc
        if bad:  # a bad sample may stand in for an earlier fault too: `mark` finds where it was read
            self.mark(flight, dict.fromkeys(bad, reason))

    def close(self) -> None:
        self._probe = None

    def _undecodable(self, flight: Flight) -> list[int]:
        """Indices of the flight's samples the decoder fails on alone, by bisection with a decode-only pipeline."""
        drawn = flight.drawn
        assert drawn is not None
        jpgs = drawn.inputs[JPG]
        windows = drawn.inputs.get(WINDOW)
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
        probe.feed_input(JPG, [jpgs[i] for i in rows])
        if windows is not None:
            probe.feed_input(WINDOW, np.ascontiguousarray(windows[rows]))
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
