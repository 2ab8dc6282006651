"""Turn a config into the objects a run needs: the preset, batch sizes, LR, eval size, and the loaders.

Kept apart from `loop.py` so the training loop reads in one sitting.
"""
from __future__ import annotations

from dataclasses import replace

from stagewise.loaders import Loader, StageParams
from stagewise.model.variants import Variant
from stagewise.train.config import Config, ConfigError
from stagewise.train.distributed import Dist
from stagewise.train.schedule import PRESETS, Preset, StagePlan, StageValues, get_preset


def resolve_preset(cfg: Config, variant: Variant | None) -> Preset:
    """Table 6 preset by name, else one built from the model's variant row, then `schedule.min_*/max_*` overrides.

    Models that are not in Table 6 get its shared minimum values (128 px,
    RandAugment 5, mixup 0, dropout 0.1; capped at their maximum) and the
    maximum values from their `model/` row (final train size, RandAugment,
    mixup, dropout). torchvision models, which have no row, default to the
    efficientnetv2_s row of Table 6.
    """
    s = cfg.schedule
    name = s.preset or (cfg.model.name if cfg.model.name in PRESETS else "")
    if name:
        base = get_preset(name)
    elif variant is not None:
        base = Preset(variant.name, min(128, variant.train_size), variant.train_size,
                      min(5.0, variant.randaug_magnitude), float(variant.randaug_magnitude),
                      0.0, variant.mixup_alpha, min(0.1, variant.dropout), variant.dropout)
    else:
        base = replace(PRESETS["efficientnetv2_s"], name=cfg.model.name)
    overrides = {
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


def global_batch(cfg: Config, world_size: int) -> int:
    """Images per optimizer step over all ranks: optim.batch_per_rank x world, or optim.batch_size."""
    if cfg.optim.batch_per_rank > 0:
        return cfg.optim.batch_per_rank * world_size
    if cfg.optim.batch_size % world_size:
        raise ConfigError(f"optim.batch_size={cfg.optim.batch_size} is not divisible by the {world_size} processes")
    return cfg.optim.batch_size


def eval_size_and_crop(cfg: Config, variant: Variant | None, preset: Preset) -> tuple[int, float]:
    """Test size and crop: config, else the variant's (paper: S 384, M/L 480, crop 1.0), else the last train size."""
    size = cfg.data.eval_size or (variant.eval_size if variant else preset.max_size)
    crop = cfg.data.eval_crop_pct or (variant.eval_crop_pct if variant else 1.0)
    return size, crop


def loader_params(values: StageValues, cfg: Config) -> StageParams:
    return StageParams(image_size=values.image_size, randaug_magnitude=values.randaug_magnitude,
                       mixup_alpha=values.mixup_alpha, randaug_ops=cfg.data.randaug_ops,
                       label_smoothing=cfg.optim.label_smoothing)


def loader_device(cfg: Config, d: Dist) -> str:
    return d.device.type if cfg.data.device == "auto" else cfg.data.device


def train_loader(cfg: Config, stage: StagePlan, d: Dist) -> Loader:
    return Loader(cfg.data.url, split=cfg.data.train_split, batch_size=stage.batch_size // d.world_size,
                  stage=loader_params(stage.values, cfg), device=loader_device(cfg, d), train=True,
                  seed=cfg.run.seed, rank=d.rank, world_size=d.world_size,
                  num_threads=cfg.data.num_threads or None, mean=cfg.data.mean, std=cfg.data.std,
                  on_error=cfg.data.on_error, channels_last=cfg.model.channels_last, scale=cfg.data.crop_scale,
                  hflip_prob=cfg.data.hflip_prob)


def eval_loader(cfg: Config, size: int, crop: float, batch: int, d: Dist) -> Loader:
    params = StageParams(image_size=size, randaug_magnitude=0.0, mixup_alpha=0.0)
    return Loader(cfg.data.url, split=cfg.data.val_split, batch_size=max(1, batch // d.world_size), stage=params,
                  device=loader_device(cfg, d), train=False, seed=cfg.run.seed, rank=d.rank,
                  world_size=d.world_size, num_threads=cfg.data.num_threads or None, crop_pct=crop,
                  mean=cfg.data.mean, std=cfg.data.std, on_error=cfg.data.on_error,
                  channels_last=cfg.model.channels_last)
