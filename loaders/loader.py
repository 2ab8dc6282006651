"""`Loader`: batches of (images, targets) from a shard split, with stages pushed at run time.

    loader = Loader("s3://bucket/imagenet", split="train", batch_size=64,
                    stage=StageParams(image_size=128, randaug_magnitude=5, mixup_alpha=0),
                    device="cpu")
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images, targets in loader:
            ...
        loader.set_stage(StageParams(image_size=192, randaug_magnitude=10, mixup_alpha=0.1))

The DALI pipeline is built once, in the constructor. `set_stage` takes effect
from the very next batch pulled (batches already in flight are fed again).
`state_dict()` is the position of the next batch; `load_state_dict` resumes there
with the same batches an uninterrupted run yields (bit-identical in CPU mode).
While a training epoch ends, the next one is already being read and processed.
"""
from __future__ import annotations

import os
from dataclasses import asdict

import torch

from stagewise.shards import open_split
from stagewise.loaders.mixup import mix_targets, soft_targets
from stagewise.loaders.params import StageParams
from stagewise.loaders.graph import GraphSpec
from stagewise.loaders.plan import plan_epoch
from stagewise.loaders.randaugment import RandAugmentConfig
from stagewise.loaders.shard_stream import LoaderError, SampleReader
from stagewise.loaders.runner import Epoch, Runner

ON_ERROR = ("raise", "skip")


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
        num_threads: int | None = None,
        crop_pct: float = 1.0,
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        on_error: str = "raise",
        channels_last: bool = False,
        scale: tuple[float, float] = (0.08, 1.0),  # RandomResizedCrop area range; the reference uses (0.05, 1)
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip_prob: float = 0.5,  # train: chance that a sample is mirrored left-right; 0 for digits, text
        randaug_layers: int | None = None,  # RandAugment layers built; default: the first stage's randaug_ops
        randaug_clamp: float | None = None,  # None: reference TF scale (no clamp); 10: timm's clamp
        shuffle_buffer: int = 1024,  # samples
        pipelines: int | None = None,  # DALI pipelines; default: one per CPU thread in CPU mode, 1 on GPU
        prefetch: int | None = None,  # batches in flight per pipeline; default 1 on CPU, 2 on GPU
        reader_threads: int = 2,
        retries: int = 3,  # per read, for transient errors
        backoff: float = 0.5,  # seconds before the first retry, doubling
        timeout: float = 300.0,  # seconds without reader progress before giving up
    ) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r}: expected one of {ON_ERROR}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct={crop_pct}: must be in (0, 1]")
        if not (0 < scale[0] <= scale[1] <= 1) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"scale={scale} / ratio={ratio}: need 0 < lo <= hi (scale hi <= 1)")
        if isinstance(hflip_prob, bool) or not isinstance(hflip_prob, (int, float)) or not 0 <= hflip_prob <= 1:
            raise ValueError(f"hflip_prob={hflip_prob!r}: must be a number in [0, 1]")
        gpu, device_id = _parse_device(device)
        self.device = torch.device("cuda", device_id) if gpu else torch.device("cpu")
        self.rank, self.world_size = _distributed(rank, world_size)
        self.view = open_split(url, split)
        self.url, self.split, self.batch_size, self.train, self.seed = url, split, batch_size, train, seed
        self.hflip_prob = float(hflip_prob)
        self.shuffle_buffer = shuffle_buffer if train else 0
        self.num_threads = num_threads or len(os.sched_getaffinity(0))
        self._sizes = [s.num_samples for s in self.view.info.shards]
        self._reader_args = dict(threads=reader_threads, retries=retries, backoff=backoff, timeout=timeout)
        layers = stage.randaug_ops if randaug_layers is None else randaug_layers
        spec = GraphSpec(
            train=train, gpu=gpu, layers=layers if train else 0, randaug=RandAugmentConfig(clamp=randaug_clamp),
            mean=tuple(mean), std=tuple(std), channels_last=channels_last,
        )
        pipes = pipelines or (1 if gpu else self.num_threads)
        self._runner = Runner(
            spec, batch_size=batch_size, pipelines=pipes, threads_per_pipeline=max(1, self.num_threads // pipes),
            device_id=device_id, depth=prefetch or (2 if gpu else 1), seed=seed, scale=scale, ratio=ratio,
            hflip_prob=self.hflip_prob, crop_pct=crop_pct, on_error=on_error, stage=stage,
            open_epoch=self._open_epoch,
        )
        self._runner.set_stage(stage)
        self.stage = stage
        self._epoch: int | None = None
        self._position = 0  # batches of the current epoch already yielded
        self._pending: tuple[int, int] | None = None  # from load_state_dict
        self._len = plan_epoch(self._sizes, **self._plan_args(0)).num_batches

    # ------------------------------------------------------------------ public API
    def __len__(self) -> int:
        """Batches per epoch for this rank; the same on every rank."""
        return self._len

    @property
    def num_classes(self) -> int:
        return self.view.num_classes

    @property
    def skipped(self) -> int:
        """Samples skipped (and replaced) under on_error='skip'."""
        return self._runner.skipped

    @property
    def faults(self) -> list[str]:
        """The first (up to 100) faults skipped, each naming its shard and sample."""
        return list(self._runner.faults)

    @property
    def retried(self) -> int:
        """Transient read errors retried so far (S3 5xx, timeouts, dropped connections)."""
        return self._runner.retried

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` at batch 0, or at the batch a preceding `load_state_dict` named for it."""
        start = self._pending[1] if self._pending and self._pending[0] == epoch else 0
        self._pending = None
        self._start(epoch, start)

    def set_stage(self, stage: StageParams) -> None:
        """Takes effect from the very next batch pulled (in-flight batches are fed again)."""
        self._runner.set_stage(stage)
        self.stage = stage

    def state_dict(self) -> dict:
        epoch, batch = self._pending or (self._epoch if self._epoch is not None else 0, self._position)
        return {
            "epoch": epoch, "batch": batch, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
            "batch_size": self.batch_size, "split": self.split, "stage": asdict(self.stage),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at (epoch, batch); the next iteration yields exactly the batches an uninterrupted run would."""
        for key in ("seed", "world_size", "batch_size", "split"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"loader state has {key}={state[key]!r} but this loader has {getattr(self, key)!r}: "
                    "the sample order would differ"
                )
        batch = int(state["batch"])
        if not 0 <= batch <= len(self):
            raise ValueError(f"loader state batch={batch} outside 0..{len(self)}")
        self._pending = (int(state["epoch"]), batch)

    def __iter__(self):
        if self._pending is not None:
            self.set_epoch(self._pending[0])
        if self._epoch is None:
            if self.train:
                raise RuntimeError("call loader.set_epoch(epoch) before iterating a training loader")
            self.set_epoch(0)
        elif self._position >= len(self):
            if self.train:
                raise RuntimeError(f"epoch {self._epoch} is over: call loader.set_epoch({self._epoch + 1})")
            self.set_epoch(self._epoch)  # eval: every pass is the same
        return self._batches()

    def close(self) -> None:
        self._runner.close()

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _plan_args(self, epoch: int) -> dict:
        return dict(train=self.train, seed=self.seed, epoch=epoch, rank=self.rank, world_size=self.world_size,
                    batch_size=self.batch_size, buffer=self.shuffle_buffer)

    def _open_epoch(self, epoch: int, batch: int) -> Epoch:
        """The plan of `epoch` and a reader started at `batch` (called by the runner)."""
        plan = plan_epoch(self._sizes, **self._plan_args(epoch))
        reader = SampleReader(
            self.view.shard_urls, self.view.index_urls, self._sizes, plan, start_position=batch * self.batch_size,
            multi_label=self.view.info.multi_label, num_classes=self.num_classes,
            buffer=self.shuffle_buffer, lookahead=8 * self.batch_size, **self._reader_args,
        )
        return Epoch(epoch, plan, reader, next_feed=batch)

    def _start(self, epoch: int, batch: int) -> None:
        self._runner.begin_epoch(epoch, batch)  # reuses batches of `epoch` the runner opened early
        self._epoch, self._position = epoch, batch

    def _batches(self):
        while self._position < len(self):
            images, flight = self._runner.pull()
            stage = flight.stage
            images = images if images.device == self.device else images.to(self.device)
            if not self.train:
                labels = torch.tensor([it.label for it in flight.items], dtype=torch.int64)
                labels[torch.from_numpy(~flight.real)] = -1  # padding: not to be counted
                targets = labels.to(self.device)
            elif stage.soft_targets or self.view.info.multi_label:
                targets = soft_targets([it.labels for it in flight.items], self.num_classes, stage.label_smoothing,
                                       self.device)
                targets = mix_targets(targets, flight.mix)  # the images were mixed in the pipeline
            else:
                targets = torch.tensor([it.label for it in flight.items], dtype=torch.int64, device=self.device)
            self._position += 1
            yield images, targets


def _parse_device(device: str) -> tuple[bool, int | None]:
    if device == "cpu":
        return False, None
    if device == "cuda" or device.startswith("cuda:"):
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
