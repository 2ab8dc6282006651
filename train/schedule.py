"""Progressive learning with adaptive regularization: which image size and regularization each stage uses.

Pure functions of (stage, number of stages, preset, schedule kind), as FFCV's
`get_resolution`; no I/O. Presets derive from the variant table (`model/variants.py`,
where Table 6 is stored). Three schedule kinds of the paper's:

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

Two peer schedules, the ones a user picks today for a faster ImageNet run
(issue 21), written from their documented rules; both keep regularization at
its final values (their recipes hold it constant) whatever `adaptive` says, and
the size is a function of the epoch, so a stage is a run of epochs at one size:

- "ffcv": FFCV's ImageNet example (libffcv/ffcv-imagenet, train_imagenet.py
  `get_resolution`, read at 4dd291a): epoch e <= start_ramp trains at min_res,
  e >= end_ramp at max_res, in between np.interp rounded to the nearest
  multiple of 32 (np.round: halves to even). Its configs (rn18_configs/,
  rn50_configs/, 16 to 88 epochs, all 160 -> 192 px) set start_ramp = 3E/4 - 1
  and end_ramp = 7E/8 - 1 for E epochs (16: 11, 13; 88: 65, 76; every one of
  the twelve files fits), which is what `ramp_start`/`ramp_end` < 0 mean here;
  given shares put the ramp at share * E. Deviation: intermediate sizes are
  clamped to [S0, Se] (FFCV's sizes are multiples of 32, so its rounding never
  leaves the range; ours need not be).
- "composer": MosaicML Composer's ProgressiveResizing
  (composer/algorithms/progressive_resizing/progressive_resizing.py, read at
  6405188): with t the elapsed share of the run, the ramp share is 0 before
  delay_fraction, then (t - delay) / (1 - finetune - delay) capped at 1; scale
  = initial_scale + (1 - initial_scale) * ramp share; the width is pinned to a
  multiple of size_increment (4 by default; `round`, halves to even). Its
  suggested ResNet-50 values are the defaults here: initial scale 0.5, delay
  0.5, finetune 0.2. initial_scale is S0/Se (the user's start scale is
  `min_size`). Deviations: Composer rescales every batch by the elapsed share;
  the loader here changes size at epoch boundaries, so epoch e takes the scale
  at its middle, t = (e + 0.5)/E (inside the ramp, the mean of Composer's
  per-batch scales over that epoch, so its sizes match Composer's on
  average); the first and last sizes are exactly S0 and Se (Composer pins the
  initial width to the increment too); delay + finetune = 1 is a step from S0
  to Se at the delay (Composer divides by zero there). Composer's default mode 'resize'
  interpolates the full-size batch down (nearest neighbour); the loader here
  random-resized-crops each image straight to the stage size, the same crop
  area at fewer pixels, i.e. 'resize' and not 'crop'.

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

SCHEDULES = ("paper", "automl", "random-resize", "ffcv", "composer")
STAGED = ("paper", "automl")  # the kinds that lay `schedule.stages` over the epochs; the others derive their stages
PEERS = ("ffcv", "composer")  # size a function of the epoch, regularization constant (issue 21)
SIZE_MULTIPLE = 8  # px; intermediate sizes are rounded to this (issue 5)
FFCV_MULTIPLE = 32  # px; get_resolution rounds its interpolated sizes to this
COMPOSER_INCREMENT = 4  # px; ProgressiveResizing's size_increment default


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


@dataclass(frozen=True)
class PeerRule:
    """The peer schedules' settings, shares of the run (config keys of the same names)."""

    ramp_start: float = -1.0  # ffcv: share of the run where the size ramp starts; < 0 = FFCV's configs' 3E/4 - 1
    ramp_end: float = -1.0  # ffcv: where it ends; < 0 = FFCV's configs' 7E/8 - 1
    delay_fraction: float = 0.5  # composer: share of the run at S0 before the ramp
    finetune_fraction: float = 0.2  # composer: share at the end at Se

    @classmethod
    def from_config(cls, s: ScheduleConfig) -> "PeerRule":
        return cls(s.ramp_start, s.ramp_end, s.delay_fraction, s.finetune_fraction)

    def ramp_epochs(self, epochs: int) -> tuple[float, float]:
        """ffcv: (start_ramp, end_ramp) in epochs, as get_resolution compares them with the 0-based epoch."""
        start = self.ramp_start * epochs if self.ramp_start >= 0 else 0.75 * epochs - 1
        end = self.ramp_end * epochs if self.ramp_end >= 0 else 0.875 * epochs - 1
        return start, end


def check_rule(schedule: str, rule: PeerRule) -> None:
    """The settings the kind reads, each problem one line naming its key; the others are not read, not checked."""
    if schedule == "ffcv":
        for key, v in (("ramp_start", rule.ramp_start), ("ramp_end", rule.ramp_end)):
            if v > 1:
                raise ValueError(f"schedule.{key}={v:g} is a share of the run: pass a value in [0, 1] "
                                 f"(or < 0 = FFCV's configs')")
        if (rule.ramp_start >= 0) != (rule.ramp_end >= 0):
            raise ValueError(f"schedule.ramp_start={rule.ramp_start:g} and schedule.ramp_end={rule.ramp_end:g} go "
                             f"together: pass both shares, or neither (< 0 = FFCV's configs')")
        if rule.ramp_start >= 0 and rule.ramp_end <= rule.ramp_start:
            raise ValueError(f"schedule.ramp_end={rule.ramp_end:g} must be above "
                             f"schedule.ramp_start={rule.ramp_start:g} (shares of the run)")
    elif schedule == "composer":
        for key, v in (("delay_fraction", rule.delay_fraction), ("finetune_fraction", rule.finetune_fraction)):
            if not 0 <= v <= 1:
                raise ValueError(f"schedule.{key}={v:g} is a share of the run: pass a value in [0, 1]")
        if rule.delay_fraction + rule.finetune_fraction > 1:
            raise ValueError(f"schedule.delay_fraction={rule.delay_fraction:g} + "
                             f"schedule.finetune_fraction={rule.finetune_fraction:g} is above 1 (shares of the run)")


def check_config(s: ScheduleConfig) -> None:
    """`schedule.kind` and the settings it reads (preflight's one call; the rules are check_kind's and
    check_rule's); a bad setting reads `schedule.kind=ffcv: schedule.ramp_end=0.5 must be above ...`."""
    check_kind(s.kind)
    try:
        check_rule(s.kind, PeerRule.from_config(s))
    except ValueError as exc:
        raise ValueError(f"schedule.kind={s.kind}: {exc}") from None


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
    if schedule in PEERS:
        raise ValueError(f"the {schedule} schedule sizes epochs, not stages: use plan() or peer_size()")
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


def peer_size(epoch: int, epochs: int, preset: Preset, schedule: str, rule: PeerRule = PeerRule()) -> int:
    """The train size of epoch `epoch` (0-based) of `epochs` under a peer schedule; see the module docstring."""
    check_rule(schedule, rule)
    if not 0 <= epoch < epochs:
        raise ValueError(f"epoch must be in [0, {epochs}), got {epoch}")
    lo, hi = preset.min_size, preset.max_size
    if schedule == "ffcv":  # get_resolution(epoch, min_res, max_res, end_ramp, start_ramp)
        start, end = rule.ramp_epochs(epochs)
        if epoch <= start:
            return lo
        if epoch >= end:
            return hi
        size = FFCV_MULTIPLE * round(_lerp(lo, hi, (epoch - start) / (end - start)) / FFCV_MULTIPLE)
    elif schedule == "composer":  # ProgressiveResizing.apply, at the epoch's middle batch
        t = (epoch + 0.5) / epochs  # elapsed share of the run
        delay, ramp = rule.delay_fraction, 1 - rule.finetune_fraction - rule.delay_fraction
        if t < delay:
            return lo
        if ramp <= 0 or t - delay >= ramp:  # ramp <= 0: a step at the delay (Composer divides by zero)
            return hi
        scale = _lerp(lo / hi, 1.0, (t - delay) / ramp)
        size = COMPOSER_INCREMENT * round(hi * scale / COMPOSER_INCREMENT)
    else:
        raise ValueError(f"{schedule!r} is not a peer schedule ({', '.join(PEERS)})")
    return min(hi, max(lo, size))  # deviation from both: never outside [S0, Se]


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
         per_stage_batch: bool = False, batch_multiple: int = 1, peer: PeerRule = PeerRule()) -> list[StagePlan]:
    """Lay the stages over `epochs` epochs of `num_images` images.

    paper/automl: stage i covers epochs [floor(i*E/M), floor((i+1)*E/M)) (the
    official code's boundaries). random-resize: one stage per `chunk_epochs`
    epochs, so M = ceil(E / chunk_epochs). ffcv/composer: one stage per run of
    consecutive epochs at one size (`peer_size`), `n_stages` unused. Stage
    boundaries fall on epoch boundaries, so a stage change never splits an epoch.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    check_kind(schedule)
    values: list[StageValues] | None = None
    if schedule in PEERS:
        sizes = [peer_size(e, epochs, preset, schedule, peer) for e in range(epochs)]
        bounds = [0] + [e for e in range(1, epochs) if sizes[e] != sizes[e - 1]] + [epochs]
        n_stages = len(bounds) - 1
        values = [StageValues(image_size=sizes[b], randaug_magnitude=preset.max_randaug,  # constant: the final
                              mixup_alpha=preset.max_mixup, dropout=preset.max_dropout) for b in bounds[:-1]]
    elif schedule == "random-resize":
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
        v = values[i] if values else stage_values(i, n_stages, preset, schedule, adaptive=adaptive, seed=seed)
        b = batch_size
        if per_stage_batch:
            b = stage_batch_size(batch_size, v.image_size, preset.max_size, batch_multiple)
        steps_per_epoch = num_images // b
        if steps_per_epoch < 1:
            raise ValueError(f"stage {i + 1}: batch {b} is larger than the {num_images} training images")
        rows.append(StagePlan(i, n_stages, v, bounds[i], bounds[i + 1], b, steps_per_epoch))
    return rows

