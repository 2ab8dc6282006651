"""The run's data, from its config: the global batch, the eval size, and the train and eval loaders."""
from __future__ import annotations

from stagewise.loaders import AugmentSpec, EngineSpec, Loader, ReadSpec, StageParams
from stagewise.model.variants import Variant, get_variant
from stagewise.train.config import Config, ConfigError
from stagewise.train.distributed import Dist
from stagewise.train.schedule import Preset, StagePlan


_S = get_variant("efficientnetv2_s")
_S_TEST_TO_TRAIN = _S.eval_size / _S.train_size  # 384 / 300 (paper §5.1 and the official config)


def global_batch(cfg: Config, world_size: int) -> int:
    """Images per optimizer step over all ranks: optim.batch_per_rank x world, or optim.batch_size."""
    if cfg.optim.batch_per_rank > 0:
        return cfg.optim.batch_per_rank * world_size
    if cfg.optim.batch_size % world_size:
        raise ConfigError(f"optim.batch_size={cfg.optim.batch_size} is not divisible by the {world_size} processes")
    return cfg.optim.batch_size


def eval_size_and_crop(cfg: Config, variant: Variant | None, preset: Preset) -> tuple[int, float]:
    """Test size and crop: data.eval_size / eval_crop_pct, else the variant's test-to-train ratio applied to the
    final train size the run actually uses (paper: S trains up to 300 and tests at 384, 1.28x).

    Testing above the final train size is part of the recipe, not a detail: random-resized crops show objects
    larger than a center crop at the same size does (Touvron et al. 2019, "FixRes"). Measured on the texture
    task (docs/training.md): progressive weights trained up to 128 px scored 68.3 % tested at 128 and 79.8 %
    at 160. So a run whose `schedule.max_size` overrides the row's train size keeps the row's ratio (B0 trained
    up to 128: tested at 149, not at B0's own 224). Models without a row use efficientnetv2_s's ratio.
    """
    ratio = (variant.eval_size / variant.train_size) if variant else _S_TEST_TO_TRAIN
    size = cfg.data.eval_size or round(preset.max_size * ratio)
    crop = cfg.data.eval_crop_pct or (variant.eval_crop_pct if variant else 1.0)
    return size, crop


def stage_params(stage: StagePlan, cfg: Config) -> StageParams:
    """What the loader receives at the start of `stage`."""
    return stage.values.loader_params(randaug_ops=cfg.data.randaug_ops, label_smoothing=cfg.optim.label_smoothing)


def loader_device(cfg: Config, d: Dist) -> str:
    return d.device.type if cfg.data.device == "auto" else cfg.data.device


def train_loader(cfg: Config, stage: StagePlan, d: Dist) -> Loader:
    augment = AugmentSpec(scale=cfg.data.crop_scale, hflip_prob=cfg.data.hflip_prob, mean=cfg.data.mean,
                          std=cfg.data.std, channels_last=cfg.model.channels_last)
    return Loader(cfg.data.url, split=cfg.data.train_split, batch_size=stage.batch_size // d.world_size,
                  stage=stage_params(stage, cfg), device=loader_device(cfg, d), train=True,
                  seed=cfg.run.seed, rank=d.rank, world_size=d.world_size,
                  num_threads=cfg.data.num_threads or None, augment=augment,
                  reading=ReadSpec(on_error=cfg.data.on_error), engine=engine_spec(cfg))


def engine_spec(cfg: Config) -> EngineSpec:
    return EngineSpec(host_decode={"auto": None, "host": True, "dali": False}[cfg.data.cpu_decoder])


def eval_loader(cfg: Config, size: int, crop: float, batch: int, d: Dist) -> Loader:
    params = StageParams(image_size=size, randaug_magnitude=0.0, mixup_alpha=0.0)
    augment = AugmentSpec(crop_pct=crop, mean=cfg.data.mean, std=cfg.data.std, channels_last=cfg.model.channels_last)
    return Loader(cfg.data.url, split=cfg.data.val_split, batch_size=max(1, batch // d.world_size), stage=params,
                  device=loader_device(cfg, d), train=False, seed=cfg.run.seed, rank=d.rank,
                  world_size=d.world_size, num_threads=cfg.data.num_threads or None, augment=augment,
                  reading=ReadSpec(on_error=cfg.data.on_error), engine=engine_spec(cfg))
