"""Progressive learning with adaptive regularization: which image size and regularization each stage uses.

Pure functions of (stage, number of stages, preset, schedule kind), as FFCV's
`get_resolution`; no I/O. Presets derive from the variant table (`model/variants.py`,
where Table 6 is stored). Three schedule kinds:

- "paper": the paper's Algorithm 1. Stage i of M uses S0 + (Se - S0) * i/(M-1)
  for the image size and the same formula for every regularizer, so stage 0
  trains at the minimum values and the last stage at the maximum values.
  Sizes are rounded to a multiple of 8 (friendlier to GPU kernels); the last
  stage uses exactly Se. M = 1 trains at the final values throughout.
- "automl": what google/automl's efficientnetv2 code does (main.py, main_tf2.py).
  Size ratio (i+1)/M truncated to int with no rounding to 8 (so S trains at
  171/214/257/300 and never at 128); RandAugment and mixup ramp with
  np.linspace(min, max, M), i.e. i/(M-1); dropout does NOT ramp: the code
  computes a ramp and deletes it (`del dp_list`), so every stage uses the
  final dropout.
- "random-resize": Mix&Match (Hoffer et al. 2019) as in the paper's Table 13:
  one size sampled uniformly from the multiples of 8 in [S0, Se] per chunk of
  epochs (the paper samples every 8 epochs because TPUs recompile per size);
  with adaptive regularization the regularizers follow the sampled size,
  r = (S - S0) / (Se - S0).

`adaptive=False` keeps every regularizer at its final value while the size
still changes: Table 13's "vanilla" progressive resize / random resize.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

from stagewise.loaders import StageParams
from stagewise.model.variants import TABLE_6_FIRST_STAGE, TABLE_6_MODELS, Variant, get_variant
from stagewise.pipeline.errors import count
from stagewise.train.config import ConfigError, ScheduleConfig

SCHEDULES = ("paper", "automl", "random-resize")
SIZE_MULTIPLE = 8  # px; intermediate sizes are rounded to this (issue 5)


@dataclass(frozen=True)
class Preset:
    """Min (first stage) and max (last stage) of size and regularization (paper Table 6)."""

    name: str
    min_size: int  # px
    max_size: int  # px
    min_randaug: float  # RandAugment magnitude, TF reference scale 0..~30
    max_randaug: float
    min_mixup: float  # mixup alpha; 0 = off
    max_mixup: float
    min_dropout: float  # dropout rate before the classifier
    max_dropout: float

    def __post_init__(self) -> None:
        if not 0 < self.min_size <= self.max_size:
            raise ValueError(f"preset {self.name!r}: need 0 < min_size <= max_size, "
                             f"got {self.min_size}, {self.max_size}")
        for lo, hi, what in ((self.min_randaug, self.max_randaug, "randaug"), (self.min_mixup, self.max_mixup, "mixup"),
                             (self.min_dropout, self.max_dropout, "dropout")):
            if lo < 0 or hi < 0:
                raise ValueError(f"preset {self.name!r}: {what} must be >= 0, got {lo} -> {hi}")
        if self.max_dropout >= 1 or self.min_dropout >= 1:
            raise ValueError(f"preset {self.name!r}: dropout must be < 1")


def preset_for(variant: Variant) -> Preset:
    """A model's preset, derived from its `model/` row: Table 6's shared first stage (each value capped at the
    row's final one) to the row's final train size, RandAugment, mixup and dropout."""
    first = TABLE_6_FIRST_STAGE
    return Preset(variant.name, min(first.image_size, variant.train_size), variant.train_size,
                  min(first.randaug_magnitude, variant.randaug_magnitude), float(variant.randaug_magnitude),
                  min(first.mixup_alpha, variant.mixup_alpha), variant.mixup_alpha,
                  min(first.dropout, variant.dropout), variant.dropout)


# Paper Table 6 (the rows it lists), derived from the variant table where it is stored.
PRESETS: dict[str, Preset] = {name: preset_for(get_variant(name)) for name in TABLE_6_MODELS}


def preset_from_config(s: ScheduleConfig, model_name: str, variant: Variant | None) -> Preset:
    """The run's preset: `schedule.preset` by name, else the model's own (`preset_for` its row; torchvision
    models, which have no row, get efficientnetv2_s's), then the `schedule.min_*/max_*` overrides."""
    name = s.preset or (model_name if model_name in PRESETS else "")
    if name:
        base = get_preset(name)
    elif variant is not None:
        base = preset_for(variant)
    else:
        base = replace(PRESETS["efficientnetv2_s"], name=model_name)
    overrides = {  # the config's "keep the preset's" sentinels: sizes 0, regularizers < 0
        "min_size": s.min_size if s.min_size > 0 else None,
        "max_size": s.max_size if s.max_size > 0 else None,
        "min_randaug": s.min_randaug if s.min_randaug >= 0 else None,
        "max_randaug": s.max_randaug if s.max_randaug >= 0 else None,
        "min_mixup": s.min_mixup if s.min_mixup >= 0 else None,
        "max_mixup": s.max_mixup if s.max_mixup >= 0 else None,
        "min_dropout": s.min_dropout if s.min_dropout >= 0 else None,
        "max_dropout": s.max_dropout if s.max_dropout >= 0 else None,
    }
    if overrides["max_size"] is not None and overrides["min_size"] is None:
        overrides["min_size"] = min(base.min_size, overrides["max_size"])  # a lower max caps the preset's min
    try:
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:
        raise ConfigError(f"schedule: {exc}") from None


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


@dataclass(frozen=True)
class StageValues:
    """Everything that changes at a stage boundary: the loader's part and the model's part."""

    image_size: int  # px
    randaug_magnitude: float
    mixup_alpha: float
    dropout: float

    def loader_params(self, *, randaug_ops: int, label_smoothing: float) -> StageParams:
        """The loader's share, what `loader.set_stage` receives (the one converter; dropout goes to the model)."""
        return StageParams(image_size=self.image_size, randaug_magnitude=self.randaug_magnitude,
                           mixup_alpha=self.mixup_alpha, randaug_ops=randaug_ops, label_smoothing=label_smoothing)


def _lerp(lo: float, hi: float, r: float) -> float:
    return lo + (hi - lo) * r


def _round_to_multiple(x: float) -> int:
    """Nearest multiple of 8, halves rounded up (212 -> 216)."""
    return SIZE_MULTIPLE * math.floor(x / SIZE_MULTIPLE + 0.5)


def check_kind(schedule: str) -> None:
    """The schedule kinds this module lays out (the config's `schedule.kind` is checked here, not restated)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def _check(stage: int, n_stages: int, schedule: str) -> None:
    check_kind(schedule)
    if n_stages < 1:
        raise ValueError(f"n_stages must be >= 1, got {n_stages}")
    if not 0 <= stage < n_stages:
        raise ValueError(f"stage must be in [0, {n_stages}), got {stage}")


def random_size(stage: int, preset: Preset, seed: int) -> int:
    """The size Mix&Match samples for chunk `stage`: uniform over multiples of 8 in [S0, Se], fixed by (seed, stage)."""
    lo = math.ceil(preset.min_size / SIZE_MULTIPLE)
    hi = preset.max_size // SIZE_MULTIPLE
    if hi < lo:  # no multiple of 8 inside [S0, Se]
        return preset.max_size
    return SIZE_MULTIPLE * random.Random(f"random-resize/{seed}/{stage}").randint(lo, hi)


def stage_values(stage: int, n_stages: int, preset: Preset, schedule: str = "paper", *,
                 adaptive: bool = True, seed: int = 0) -> StageValues:
    """Size and regularization of stage `stage` (0-based) of `n_stages`; see the module docstring."""
    _check(stage, n_stages, schedule)
    p = preset
    last = stage == n_stages - 1
    if schedule == "paper":
        r = stage / (n_stages - 1) if n_stages > 1 else 1.0  # Algorithm 1
        size = p.max_size if last else _round_to_multiple(_lerp(p.min_size, p.max_size, r))
        reg_r = r
    elif schedule == "automl":
        size = int(_lerp(p.min_size, p.max_size, (stage + 1) / n_stages))  # official: int(ibase + (S - ibase) * ratio)
        reg_r = stage / (n_stages - 1) if n_stages > 1 else 1.0  # official: np.linspace(min, max, stages)[stage]
    else:  # random-resize
        size = random_size(stage, p, seed)
        reg_r = (size - p.min_size) / (p.max_size - p.min_size) if p.max_size > p.min_size else 1.0
    if not adaptive:
        reg_r = 1.0  # Table 13 "vanilla": the same (final) regularization at every size
    dropout = _lerp(p.min_dropout, p.max_dropout, reg_r)
    if schedule == "automl":
        dropout = p.max_dropout  # the official code never applies its dropout ramp
    return StageValues(
        image_size=int(size),
        randaug_magnitude=_lerp(p.min_randaug, p.max_randaug, reg_r),
        mixup_alpha=_lerp(p.min_mixup, p.max_mixup, reg_r),
        dropout=dropout,
    )


# --- The plan: stages laid out over epochs and steps -----------------------------------


@dataclass(frozen=True)
class StagePlan:
    """One stage of a run: its values and where it sits in the run."""

    stage: int  # 0-based; printed 1-based
    n_stages: int
    values: StageValues
    start_epoch: int  # first epoch of the stage
    end_epoch: int  # one past its last epoch
    batch_size: int  # global, images per optimizer step
    steps_per_epoch: int  # global batches per epoch (the loader drops the remainder)

    @property
    def epochs(self) -> int:
        return self.end_epoch - self.start_epoch

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def line(self) -> str:
        """`stage 3/4: size 240, randaug 11.7, mixup 0.00, dropout 0.23` (stages numbered from 1)."""
        v = self.values
        return (f"stage {self.stage + 1}/{self.n_stages}: size {v.image_size}, randaug {v.randaug_magnitude:.1f}, "
                f"mixup {v.mixup_alpha:.2f}, dropout {v.dropout:.2f}")

    def to_json(self) -> dict:
        v = self.values
        return {"stage": self.stage + 1, "image_size": v.image_size, "randaug_magnitude": round(v.randaug_magnitude, 4),
                "mixup_alpha": round(v.mixup_alpha, 4), "dropout": round(v.dropout, 4), "epochs": self.epochs,
                "steps": self.steps, "batch_size": self.batch_size}


def stage_batch_size(batch_size: int, size: int, max_size: int, multiple: int) -> int:
    """Per-stage batch that keeps activation memory about constant: B * (Se/Si)^2, a multiple of `multiple`."""
    scaled = batch_size * (max_size / size) ** 2
    return max(multiple, int(scaled // multiple) * multiple)


def plan(preset: Preset, *, epochs: int, n_stages: int, schedule: str = "paper", num_images: int,
         batch_size: int, adaptive: bool = True, seed: int = 0, chunk_epochs: int = 8,
         per_stage_batch: bool = False, batch_multiple: int = 1) -> list[StagePlan]:
    """Lay the stages over `epochs` epochs of `num_images` images.

    paper/automl: stage i covers epochs [floor(i*E/M), floor((i+1)*E/M)) (the
    official code's boundaries). random-resize: one stage per `chunk_epochs`
    epochs, so M = ceil(E / chunk_epochs). Stage boundaries fall on epoch
    boundaries, so a stage change never splits an epoch.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if schedule == "random-resize":
        if chunk_epochs < 1:
            raise ValueError(f"chunk_epochs must be >= 1, got {chunk_epochs}")
        n_stages = math.ceil(epochs / chunk_epochs)
        bounds = [min(epochs, i * chunk_epochs) for i in range(n_stages + 1)]
    else:
        if not 1 <= n_stages <= epochs:
            raise ValueError(f"need 1 <= stages <= epochs, got {count(n_stages, 'stage')} over "
                             f"{count(epochs, 'epoch')}")
        bounds = [i * epochs // n_stages for i in range(n_stages + 1)]
    rows = []
    for i in range(n_stages):
        v = stage_values(i, n_stages, preset, schedule, adaptive=adaptive, seed=seed)
        b = batch_size
        if per_stage_batch:
            b = stage_batch_size(batch_size, v.image_size, preset.max_size, batch_multiple)
        steps_per_epoch = num_images // b
        if steps_per_epoch < 1:
            raise ValueError(f"stage {i + 1}: batch {b} is larger than the {num_images} training images")
        rows.append(StagePlan(i, n_stages, v, bounds[i], bounds[i + 1], b, steps_per_epoch))
    return rows

