"""The loader's settings in three typed, frozen groups, each checking its own values.

- `AugmentSpec`: what every image goes through (crop ranges, flips, RandAugment,
  eval crop, normalization, memory layout). The DALI graph is built from it.
- `ReadSpec`: how shards are read and what a bad sample does (fault policy,
  pixel limit, shuffle buffer, retries).
- `EngineSpec`: how DALI runs the graph (pipelines, prefetch, branchless
  RandAugment, the CPU's host decoder, decoder hints, executor options).
  Defaults are chosen per device.

    Loader(url, split="train", batch_size=256, stage=StageParams(128, 10, 0.2), device="cuda",
           augment=AugmentSpec(scale=(0.05, 1.0)), reading=ReadSpec(on_error="skip"))

A bad value raises a one-line ValueError naming the field and the value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from stagewise.loaders.randaugment import RandAugmentConfig
from stagewise.shards.jpeg import DEFAULT_MAX_PIXELS

ON_ERROR = ("raise", "skip")
EVAL_GEOMETRY = ("window", "torchvision")
STREAM_POLICIES = ("single", "per_backend", "per_operator")  # DALI StreamPolicy
CONCURRENCY = ("none", "backend", "full")  # DALI OperatorConcurrency


def _bad(cls: str, name: str, value: object, rule: str) -> ValueError:
    return ValueError(f"{cls}.{name}={value!r}: {rule}")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pair(cls: str, name: str, value: object) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(_number(v) for v in value):
        raise _bad(cls, name, value, "must be a pair of numbers (lo, hi)")
    return float(value[0]), float(value[1])


def _triple(cls: str, name: str, value: object) -> tuple[float, float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 3 or not all(_number(v) for v in value):
        raise _bad(cls, name, value, "must be three numbers (R, G, B) on the 0..1 scale")
    return float(value[0]), float(value[1]), float(value[2])


def _count(cls: str, name: str, value: object, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise _bad(cls, name, value, f"must be an int >= {low}" + (" or None" if allow_none else ""))


@dataclass(frozen=True)
class AugmentSpec:
    """What each image goes through. Train: random-resized crop, flip, RandAugment, mixing (from the stage),
    normalize. Eval: the center crop that resize-shorter-side-to-S/crop_pct + center-crop-S keeps, normalize."""

    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area fraction; the reference uses (0.05, 1)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect (w / h) range
    hflip_prob: float = 0.5  # train: chance that a sample is mirrored left-right; 0 for digits, text
    randaug_layers: int | None = None  # RandAugment layers built into the graph; None: the first stage's ops
    randaug: RandAugmentConfig = field(default_factory=RandAugmentConfig)  # clamp (None: TF scale; 10: timm)
    crop_pct: float = 1.0  # eval: center crop S of the shorter side resized to floor(S / crop_pct)
    eval_geometry: str = "window"  # eval: "window" (decode the kept square, whole source pixels; fastest) or
    #                                "torchvision" (Resize + CenterCrop's exact region, for torchvision/timm weights)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # on the 0..1 scale (EfficientNetV2: 0.5 / 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    channels_last: bool = False  # NCHW tensors with channels-last strides (an NHWC buffer, no copy)

    def __post_init__(self) -> None:
        cls = type(self).__name__
        scale, ratio = _pair(cls, "scale", self.scale), _pair(cls, "ratio", self.ratio)
        if not 0 < scale[0] <= scale[1] <= 1:
            raise _bad(cls, "scale", self.scale, "need 0 < lo <= hi <= 1")
        if not 0 < ratio[0] <= ratio[1]:
            raise _bad(cls, "ratio", self.ratio, "need 0 < lo <= hi")
        if not _number(self.hflip_prob) or not 0 <= self.hflip_prob <= 1:
            raise _bad(cls, "hflip_prob", self.hflip_prob, "must be a number in [0, 1]")
        _count(cls, "randaug_layers", self.randaug_layers, 0, allow_none=True)
        if not isinstance(self.randaug, RandAugmentConfig):
            raise _bad(cls, "randaug", self.randaug, "must be a RandAugmentConfig")
        if not _number(self.crop_pct) or not 0 < self.crop_pct <= 1:
            raise _bad(cls, "crop_pct", self.crop_pct, "must be in (0, 1]")
        if self.eval_geometry not in EVAL_GEOMETRY:
            raise _bad(cls, "eval_geometry", self.eval_geometry, f"expected one of {EVAL_GEOMETRY}")
        std = _triple(cls, "std", self.std)
        if min(std) <= 0:
            raise _bad(cls, "std", self.std, "must be > 0")
        if not isinstance(self.channels_last, bool):
            raise _bad(cls, "channels_last", self.channels_last, "must be a bool")
        for name, value in (("scale", scale), ("ratio", ratio), ("mean", _triple(cls, "mean", self.mean)),
                            ("std", std), ("hflip_prob", float(self.hflip_prob)), ("crop_pct", float(self.crop_pct))):
            object.__setattr__(self, name, value)  # normalized: tuples of floats, so equal specs compare equal


@dataclass(frozen=True)
class ReadSpec:
    """Reading shards and the fault policy (see docs/loader.md, Faults)."""

    on_error: str = "raise"  # "raise": LoaderError naming shard and key; "skip": replace, count, warn
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # refuse images whose frame header says h * w > this; None: no limit
    shuffle_buffer: int = 1024  # samples, train only: over the G partitions together (each gets shuffle_buffer // G)
    threads: int = 2  # reader threads per epoch
    retries: int = 3  # per read, for transient errors (connection, timeout, S3 5xx)
    backoff: float = 0.5  # seconds before the first retry, doubling
    timeout: float = 300.0  # seconds without reader progress before giving up

    def __post_init__(self) -> None:
        cls = type(self).__name__
        if self.on_error not in ON_ERROR:
            raise _bad(cls, "on_error", self.on_error, f"expected one of {ON_ERROR}")
        _count(cls, "max_pixels", self.max_pixels, 1, allow_none=True)
        _count(cls, "shuffle_buffer", self.shuffle_buffer, 0)
        _count(cls, "threads", self.threads, 1)
        _count(cls, "retries", self.retries, 0)
        for name in ("backoff", "timeout"):
            value = getattr(self, name)
            if not _number(value) or value < 0 or (name == "timeout" and value == 0):
                raise _bad(cls, name, value, "must be a number of seconds" + (" > 0" if name == "timeout" else " >= 0"))


@dataclass(frozen=True)
class EngineSpec:
    """How DALI runs the graph. None means: chosen per device (docs/loader.md, "Engine defaults")."""

    pipelines: int | None = None  # DALI pipelines; None: one per CPU thread in CPU mode, 1 on GPU
    prefetch: int | None = None  # batches in flight per pipeline; None: 1 on CPU, 2 on GPU
    branchless: bool | None = None  # RandAugment/mix without conditionals; None: on GPU only (measured on CPU)
    roi_decode: bool | None = None  # decode only the crop window; None: CPU yes, GPU no (nvImageCodec#55)
    host_decode: bool | None = None  # CPU: crop-decode-resize in C threads before DALI (loaders/_cropdecode.c);
    #                                  None: on in CPU mode when that extension is built, never on GPU
    hw_decoder_load: float = 0.65  # GPU: share of JPEGs for the hardware decoder (DALI's default)
    preallocate_width_hint: int = 0  # GPU: hardware-decoder buffer hints, px; 0 = DALI's default
    preallocate_height_hint: int = 0
    stream_policy: str | None = None  # DALI StreamPolicy: "single", "per_backend", "per_operator"; None: DALI's
    concurrency: str | None = None  # DALI OperatorConcurrency: "none", "backend", "full"; None: DALI's

    def __post_init__(self) -> None:
        cls = type(self).__name__
        _count(cls, "pipelines", self.pipelines, 1, allow_none=True)
        _count(cls, "prefetch", self.prefetch, 1, allow_none=True)
        for name in ("branchless", "roi_decode", "host_decode"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise _bad(cls, name, value, "must be True, False or None")
        if not _number(self.hw_decoder_load) or not 0 <= self.hw_decoder_load <= 1:
            raise _bad(cls, "hw_decoder_load", self.hw_decoder_load, "must be in [0, 1]")
        _count(cls, "preallocate_width_hint", self.preallocate_width_hint, 0)
        _count(cls, "preallocate_height_hint", self.preallocate_height_hint, 0)
        if self.stream_policy is not None and self.stream_policy not in STREAM_POLICIES:
            raise _bad(cls, "stream_policy", self.stream_policy, f"expected one of {STREAM_POLICIES} or None")
        if self.concurrency is not None and self.concurrency not in CONCURRENCY:
            raise _bad(cls, "concurrency", self.concurrency, f"expected one of {CONCURRENCY} or None")
