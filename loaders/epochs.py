"""A Loader's epochs and the position in them, in one place.

`Epochs` opens each epoch (its plan and shard stream, through the Loader's `open_epoch`), holds
the current one and those handed to the runner early, and counts the batches of the current
epoch already yielded: the position `Loader.state_dict` saves and `load_state_dict` restores
(`pending`). Training opens the next epoch in a background thread while the current one runs:
opening is pure Python over the epoch's samples (~1 s for an ImageNet epoch), which would
otherwise stall the consuming thread at every boundary. Epochs shorter than the pipelines'
depth are handed over several at once (`wanted`, `add_ahead`), so the pipelines stay as full
as within an epoch. The runner (loaders/runner.py) feeds the open epochs' batches and drops its
flights when the current epoch changes (`start`'s `drop`); it keeps no position of its own.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from stagewise.loaders.plan import EpochPlan
from stagewise.loaders.shard_stream import Item, ShardStream


@dataclass
class Epoch:
    number: int
    plan: EpochPlan
    stream: ShardStream
    next_feed: int  # next batch index to assemble and feed
    pad: Item | None = None  # eval padding material
    open_s: float = 0.0  # CPU seconds its opening took (plan and shard stream), on whichever thread opened it


class Epochs:
    def __init__(self, open_epoch: Callable[[int, int], Epoch], *, train: bool, stats) -> None:
        """open_epoch(number, batch): the epoch's plan and a stream started at `batch`; stats: the runner's
        `Stats`, which counts the epochs opened and their cost."""
        self._open_epoch, self.train, self.stats = open_epoch, train, stats
        self.current: Epoch | None = None
        self.ahead: list[Epoch] = []  # the next epochs in order, handed to the runner early (training only)
        self.position = 0  # batches of the current epoch already yielded
        self.pending: tuple[int, int] | None = None  # (epoch, batch) to start at, from load_state_dict
        self.retried_closed = 0  # transient errors retried by streams already closed
        self.reader_cpu_closed = 0.0
        self._next: _Opener | None = None  # training: the next epoch, opened in the background

    def open(self) -> list[Epoch]:
        """The current epoch and those handed over early, in order."""
        return ([self.current] if self.current is not None else []) + self.ahead

    def feedable(self) -> Epoch | None:
        """The first open epoch with a batch not fed yet."""
        return next((e for e in self.open() if e.next_feed < e.plan.num_batches), None)

    def start(self, number: int, drop: Callable[[Epoch | None], None]) -> None:
        """Make `number` current at batch 0, or at the batch a preceding `load_state_dict` named for it;
        drop(epoch): the runner drops its flights of that epoch (None: all)."""
        start = self.pending[1] if self.pending and self.pending[0] == number else 0
        self.pending = None
        if self.ahead and self.ahead[0].number == number and start == 0:
            assert self.current is not None
            drop(self.current)  # batches of the old epoch nobody pulled
            self._close(self.current)
            self.current = self.ahead.pop(0)  # its first batches are in flight already
        else:
            epoch = self._take_next(number) if start == 0 else self._open_epoch(number, start)
            drop(None)
            for old in self.open():
                self._close(old)
            self.current, self.ahead = epoch, []
            self._count(epoch)
        self.position = start
        self._prepare_next((self.ahead[-1].number if self.ahead else number) + 1)

    def wanted(self) -> int | None:
        """Training: the number of the epoch to hand over next, once every batch of the open epochs is fed."""
        if not self.train or self.current is None:
            return None
        last = self.ahead[-1] if self.ahead else self.current
        return last.number + 1 if last.next_feed >= last.plan.num_batches else None

    def add_ahead(self, number: int) -> None:
        epoch = self._take_next(number)
        self.ahead.append(epoch)
        self._count(epoch)
        self._prepare_next(number + 1)

    @property
    def retried(self) -> int:
        return self.retried_closed + sum(e.stream.retried for e in self.open())

    @property
    def reader_cpu(self) -> float:
        """CPU seconds spent in shard-reader threads so far."""
        return self.reader_cpu_closed + sum(e.stream.cpu_s for e in self.open())

    def close(self) -> None:
        self._prepare_next(None)
        for epoch in self.open():
            self._close(epoch)
        self.current, self.ahead = None, []

    def _count(self, epoch: Epoch) -> None:
        self.stats.epochs += 1
        self.stats.open += epoch.open_s

    def _close(self, epoch: Epoch) -> None:
        epoch.stream.close()
        self.retried_closed += epoch.stream.retried
        self.reader_cpu_closed += epoch.stream.cpu_s

    def _prepare_next(self, number: int | None) -> None:
        """Training: open `number` in a thread while the current epoch runs. None: drop the one prepared."""
        old, self._next = self._next, None
        if old is not None and (number is None or old.epoch != number):
            old.discard()
        elif old is not None:
            self._next = old
            return
        if number is not None and self.train:
            self._next = _Opener(number, self._open_epoch)

    def _take_next(self, number: int) -> Epoch:
        prepared, self._next = self._next, None
        if prepared is not None and prepared.epoch == number:
            return prepared.result()
        if prepared is not None:
            prepared.discard()
        return self._open_epoch(number, 0)


class _Opener:
    """One epoch opened in a background thread; `result()` waits for it and re-raises its error."""

    def __init__(self, epoch: int, open_epoch) -> None:
        self.epoch, self._epoch, self._error = epoch, None, None
        self._thread = threading.Thread(target=self._run, args=(open_epoch,), name=f"open-epoch-{epoch}",
                                        daemon=True)
        self._thread.start()

    def _run(self, open_epoch) -> None:
        try:
            self._epoch = open_epoch(self.epoch, 0)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer by result()
            self._error = exc

    def result(self) -> Epoch:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._epoch is not None
        return self._epoch

    def discard(self) -> None:
        self._thread.join()
        if self._epoch is not None:
            self._epoch.stream.close()
