"""`Loader`: batches of (images, targets) from a shard split, with stages pushed at run time.

    loader = Loader("s3://bucket/imagenet", split="train", batch_size=64, device="cpu",
                    stage=StageParams(image_size=128, randaug_magnitude=5, mixup_alpha=0))
    for epoch in range(epochs):
        for images, targets in loader:            # epoch 0, then 1, ...: each pass is the next epoch
            ...
        loader.set_stage(StageParams(image_size=192, randaug_magnitude=10, mixup_alpha=0.1))

The DALI pipeline is built once, in the constructor. `set_stage` takes effect
from the very next batch pulled (batches already in flight are fed again).
`state_dict()` is the global position of the next batch (epoch, global step, seed, global
batch G = batch_size x world_size); `load_state_dict` resumes there, on any world size that
divides G, with the same global steps an uninterrupted run yields (bit-identical in CPU mode
when mixup is off; mixup partners stay within a rank's slice, see docs/loader.md).
Its parts: `Epochs` (loaders/epochs.py) plans and opens each epoch and holds the position in
it (while a training epoch ends, the next one is already being read and processed);
`Runner` (loaders/runner.py) feeds the DALI pipelines and pulls their batches; `Faults`
(loaders/faults.py) decides what a bad sample becomes. `set_epoch(e)` is there for exact
control (and DDP's shared epoch number).
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import asdict, replace

import torch

from stagewise.loaders.feed import dali_view
from stagewise.loaders.graph import Layout, layout_for
from stagewise.loaders.mixup import mixed_targets
from stagewise.loaders.params import StageParams
from stagewise.loaders.plan import epoch_length, plan_epoch, world_sizes_for
from stagewise.loaders.epochs import Epoch, Epochs
from stagewise.loaders.faults import Faults
from stagewise.loaders.runner import Runner, Stats
from stagewise.loaders.shard_stream import INDEX_CACHE, IndexCache, LoaderError, ShardStream
from stagewise.loaders.spec import AugmentSpec, EngineSpec, ReadSpec
from stagewise.shards import open_split


STATE_FORMAT = 2  # state_dict's layout: 2 = a global position (1, without the key, was per rank)


class Loader:
    def __init__(
        self,
        url: str,
        *,
        split: str,
        batch_size: int,
        stage: StageParams,
        device: str = "cuda",
        train: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        num_threads: int | None = None,  # DALI CPU threads in all (and host-decoder threads); default: every core
        augment: AugmentSpec | None = None,
        reading: ReadSpec | None = None,
        engine: EngineSpec | None = None,
    ) -> None:
        augment, self.reading, self.engine = augment or AugmentSpec(), reading or ReadSpec(), engine or EngineSpec()
        for name, value, cls in (("augment", augment, AugmentSpec), ("reading", self.reading, ReadSpec),
                                 ("engine", self.engine, EngineSpec), ("stage", stage, StageParams)):
            if not isinstance(value, cls):
                raise TypeError(f"{name}={value!r}: expected a {cls.__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: must be an int >= 1")
        if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                        or num_threads < 1):
            raise ValueError(f"num_threads={num_threads!r}: must be an int >= 1 or None")
        gpu, device_id = _parse_device(device)
        self.device = torch.device("cuda", device_id) if gpu else torch.device("cpu")
        self.rank, self.world_size = _distributed(rank, world_size)
        self.view = open_split(url, split)
        self.url, self.split, self.batch_size, self.train, self.seed = url, split, batch_size, train, seed
        self.global_batch = batch_size * self.world_size  # G: a training step's samples over all ranks
        self.num_threads = num_threads or len(os.sched_getaffinity(0))
        self._sizes = [s.num_samples for s in self.view.info.shards]
        layers = stage.randaug_ops if augment.randaug_layers is None else augment.randaug_layers
        self.augment = replace(augment, randaug_layers=layers if train else 0)  # resolved: the graph is built from it
        self.layout: Layout = layout_for(train=train, gpu=gpu, engine=self.engine)
        self._len = epoch_length(self._sizes, train=train, world_size=self.world_size, batch_size=batch_size)
        # Train: a rank reads its batch_size partitions side by side, so about one shard per partition is open.
        self._indexes = IndexCache(INDEX_CACHE + (batch_size if train else 0))
        pipes = self.engine.pipelines or (1 if gpu else self.num_threads)
        stats = Stats()
        self._epochs = Epochs(self._open_epoch, train=train, stats=stats)  # the epochs and the position in them
        faults = Faults(on_error=self.reading.on_error, layout=self.layout, engine=self.engine, batch_size=batch_size,
                        device_id=device_id)
        self._runner = Runner(
            self.augment, self.layout, self.engine, batch_size=batch_size, pipelines=pipes,
            threads_per_pipeline=max(1, self.num_threads // pipes), device_id=device_id,
            depth=self.engine.prefetch or (2 if gpu or self.layout.host_decode else 1), seed=seed, faults=faults,
            epochs=self._epochs, stats=stats, stage=stage,
            first_slot=self.rank * batch_size if train else 0, global_batch=self.global_batch if train else batch_size,
        )
        self._runner.set_stage(stage)
        self.stage = stage
        self._generation = 0  # bumped by each __iter__: an older iterator stops
        self.batch_keys: list[str] = []  # the keys of the batch last yielded, as trained (faulty ones replaced)

    # ------------------------------------------------------------------ public API
    def __len__(self) -> int:
        """Batches per epoch for this rank; the same on every rank (a function of the shard sizes only)."""
        return self._len

    @property
    def num_classes(self) -> int:
        return self.view.num_classes

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        epochs = self._epochs
        if epochs.pending is not None:
            return epochs.pending[0]
        if epochs.current is None:
            return 0
        return epochs.current.number + 1 if self.train and epochs.position >= len(self) else epochs.current.number

    @property
    def hflip_prob(self) -> float:
        return self.augment.hflip_prob

    @property
    def skipped(self) -> int:
        """Samples skipped (and replaced) under on_error='skip'."""
        return self._runner.faults.skipped

    @property
    def faults(self) -> list[str]:
        """The first (up to 100) faults skipped, each naming its shard and sample."""
        return list(self._runner.faults.seen)

    @property
    def retried(self) -> int:
        """Transient read errors retried so far (S3 5xx, timeouts, dropped connections)."""
        return self._epochs.retried

    @property
    def reader_cpu(self) -> float:
        """CPU seconds the shard-reader threads have spent so far (bench-loader's accounting)."""
        return self._epochs.reader_cpu

    @property
    def host_decode_cpu(self) -> float:
        """CPU seconds the host decoder's threads have spent so far (0 when DALI decodes; bench-loader)."""
        host = self._runner.host
        return host.cpu_s if host is not None else 0.0

    @property
    def stats(self) -> Stats:
        """Consumer-thread time per part since the last `stats.reset()` (bench-loader)."""
        return self._runner.stats

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` at batch 0, or at the batch a preceding `load_state_dict` named for it."""
        self._epochs.start(epoch, self._runner.drop_flights)
        self._generation += 1

    def set_stage(self, stage: StageParams) -> None:
        """Takes effect from the very next batch pulled (in-flight batches are fed again)."""
        self._runner.set_stage(stage)
        self.stage = stage

    def state_dict(self) -> dict:
        """The global position of the next batch: the same on every rank, loadable on any world size dividing G.

        "step" counts the batches of the epoch already yielded, which are global steps (every rank
        takes one batch of each). Eval: this rank's batches of its pass (resume an eval pass on its own W).
        """
        epochs = self._epochs
        epoch, step = epochs.pending or (epochs.current.number if epochs.current else 0, epochs.position)
        return {
            "format": STATE_FORMAT, "epoch": epoch, "step": step, "seed": self.seed,
            "global_batch": self.global_batch, "split": self.split, "stage": asdict(self.stage),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at (epoch, step); the next iteration yields exactly the global steps an uninterrupted run would.

        A state saved under any world size loads if its global batch is this loader's. A state of the
        first format (keys "world_size", "batch") loads on its own world size only, at its (epoch, batch).
        """
        if "format" not in state and "world_size" in state:
            step = self._check_old_state(state)
        else:
            if state.get("format") != STATE_FORMAT:
                raise ValueError(f"loader state format {state.get('format')!r}: this loader reads {STATE_FORMAT}")
            for key in ("seed", "split"):
                if state[key] != getattr(self, key):
                    raise ValueError(f"loader state has {key}={state[key]!r} but this loader has "
                                     f"{getattr(self, key)!r}: the sample order would differ")
            g = int(state["global_batch"])
            if g != self.global_batch:
                sizes = ", ".join(map(str, world_sizes_for(g)))
                raise ValueError(
                    f"loader state has global batch {g}; this loader's is {self.global_batch} "
                    f"({self.world_size} ranks x {self.batch_size}): resume with a world size dividing {g} "
                    f"({sizes}) and batch_size = {g} / world size"
                )
            step = int(state["step"])
        if not 0 <= step <= len(self):
            raise ValueError(f"loader state step={step} outside 0..{len(self)}")
        self._epochs.pending = (int(state["epoch"]), step)

    def _check_old_state(self, state: dict) -> int:
        """A first-format state (per rank: "world_size", "batch_size", "batch"): its own world size only."""
        for key in ("seed", "world_size", "batch_size", "split"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"loader state (first format) has {key}={state[key]!r} but this loader has "
                    f"{getattr(self, key)!r}: a state of this format resumes on its own world size and batch size"
                )
        warnings.warn(
            f"loader state of the first format: resuming epoch {state['epoch']} at batch {state['batch']}; the rest "
            "of that epoch follows the world-size-independent plan, so its sample order differs from the saved run's",
            RuntimeWarning, stacklevel=3,
        )
        return int(state["batch"])

    def __iter__(self):
        """The rest of the current epoch; once it is over, the next epoch (train) or the same one again (eval).

        So `for x, y in loader` works without `set_epoch`: epoch 0, then 1, ... A pass broken off
        early continues where it stopped (state_dict() names that batch); `set_epoch(e)` starts e.
        """
        epochs = self._epochs
        if epochs.pending is not None:
            self.set_epoch(epochs.pending[0])
        elif epochs.current is None:
            self.set_epoch(0)
        elif epochs.position >= len(self):
            self.set_epoch(epochs.current.number + 1 if self.train else epochs.current.number)
        else:
            self._generation += 1
        return self._batches(self._generation)

    def close(self) -> None:
        self._runner.close()
        self._epochs.close()

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _open_epoch(self, epoch: int, batch: int) -> Epoch:
        """The plan of `epoch` and a shard stream started at `batch`."""
        start = time.thread_time()
        plan = plan_epoch(self._sizes, train=self.train, seed=self.seed, epoch=epoch, rank=self.rank,
                          world_size=self.world_size, batch_size=self.batch_size,
                          buffer=self.reading.shuffle_buffer // self.global_batch if self.train else 0)
        r = self.reading
        stream = ShardStream(
            self.view.shard_urls, self.view.index_urls, self._sizes, plan, start_position=batch * self.batch_size,
            multi_label=self.view.info.multi_label, num_classes=self.num_classes, threads=r.threads,
            retries=r.retries, backoff=r.backoff, timeout=r.timeout, lookahead=8 * self.batch_size,
            max_pixels=r.max_pixels, index_cache=self._indexes, wrap=dali_view,
        )
        return Epoch(epoch, plan, stream, next_feed=batch, open_s=time.thread_time() - start)

    def _batches(self, generation: int):
        runner, epochs = self._runner, self._epochs
        while True:
            if generation != self._generation:
                raise RuntimeError("this loader iterator was replaced by a newer iter(loader) or set_epoch()")
            if epochs.position >= len(self):
                return
            images, flight = runner.pull()
            runner.top_up()  # the next epochs keep the pipelines busy
            start = time.thread_time()
            targets = self._targets(flight)
            runner.stats.handover += time.thread_time() - start
            epochs.position += 1
            self.batch_keys = [it.key for it in flight.items]
            yield images, targets

    def _targets(self, flight) -> torch.Tensor:
        if not self.train:
            labels = torch.tensor([it.label for it in flight.items], dtype=torch.int64)
            labels[torch.from_numpy(~flight.real)] = -1  # padding: not to be counted
            return labels.to(self.device)
        if flight.stage.soft_targets or self.view.info.multi_label:
            targets = mixed_targets([it.labels for it in flight.items], self.num_classes,
                                    flight.stage.label_smoothing, flight.mix)  # the images were mixed in the pipeline
            return torch.from_numpy(targets).to(self.device)
        return torch.tensor([it.label for it in flight.items], dtype=torch.int64).to(self.device)


def _parse_device(device: str) -> tuple[bool, int | None]:
    if device == "cpu":
        return False, None
    if isinstance(device, str) and (device == "cuda" or device.startswith("cuda:")):
        if not torch.cuda.is_available():
            raise LoaderError(f"device={device!r} but CUDA is not available; use device='cpu' (DALI's CPU mode)")
        index = int(device.split(":", 1)[1]) if ":" in device else torch.cuda.current_device()
        return True, index
    raise ValueError(f"device={device!r}: expected 'cuda', 'cuda:N' or 'cpu'")


def _distributed(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values win; else torch.distributed's when initialized; else a single process."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
    rank, world_size = (0 if rank is None else rank), (1 if world_size is None else world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
    return rank, world_size
