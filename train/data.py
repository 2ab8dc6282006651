"""The run's data, from its config: the defaults that fit the data, the global batch, the eval size, and the
train and eval loaders."""
from __future__ import annotations

import itertools
import statistics

from stagewise.loaders import AugmentSpec, EngineSpec, Loader, ReadSpec, StageParams
from stagewise.loaders.plan import world_sizes_for
from stagewise.model.variants import Variant, get_variant
from stagewise.shards import SplitView, iter_meta
from stagewise.train.config import CPU_DECODERS, Config, ConfigError
from stagewise.train.distributed import Dist
from stagewise.train.schedule import SIZE_MULTIPLE, Preset, StagePlan


_S = get_variant("efficientnetv2_s")
_S_TEST_TO_TRAIN = _S.eval_size / _S.train_size  # 384 / 300 (paper §5.1 and the official config)


# --- Defaults that fit the data (docs/training.md, "Defaults that fit the data") ----------------------------

PAPER_BATCH = 4096  # global batch, paper §5.1
IMAGES_PER_BATCH = 40  # auto batch ~ images / 40: 1,600 images -> 32 (the texture task's tuned batch), >= 40 steps
MIN_AUTO_BATCH = 16  # below this BN's batch statistics get noisy
MAX_AUTO_DROP = 0.05  # share of the images an auto batch may leave out per epoch (preflight notes more)
PAPER_EPOCHS, PAPER_WARMUP, PAPER_DECAY_EPOCHS = 350, 5.0, 2.4  # paper §5.1
MAX_WARMUP_SHARE = 0.1  # of the run: a short run warms up for at most a tenth of itself
TF_BN_MOMENTUM = 0.01  # torch convention of TF's 0.99, what model/ builds
BN_WINDOW_STEPS = 50  # auto BN momentum 50/steps: running statistics average over at most ~2% of a short run
STRIDE = 32  # px per deepest-map pixel of the ImageNet ConvNets (model/ variants, ResNets) when the model won't say
SIDE_SAMPLE = 64  # samples whose json member gives the data's image size: a few KB of ranged reads each


def auto_batch(num_images: int, world_size: int = 1) -> int:
    """The paper's 4096 where the data holds it, else the power of two at or below images / 40 (at least 16 when
    the data holds 16); where that would leave out over 5% of the images every epoch (the last, partial batch is
    dropped), equal batches of about that size instead (24 images: 12, not 16). A multiple of the world size."""
    target = min(PAPER_BATCH, max(MIN_AUTO_BATCH, num_images // IMAGES_PER_BATCH), num_images)
    b = 1 << max(0, target.bit_length() - 1)  # the power of two at or below
    if num_images % b > MAX_AUTO_DROP * num_images:
        b = num_images // round(num_images / b)
    return max(world_size, b // world_size * world_size)


def auto_warmup(epochs: float) -> float:
    """The paper's 5 epochs, at most a tenth of the run (a 12-epoch run: 1.2)."""
    return min(PAPER_WARMUP, MAX_WARMUP_SHARE * epochs)


def auto_decay_epochs(epochs: float) -> float:
    """2.4 epochs per 350, scaled to the run: the exponential decay ends where the paper's does (x0.012)."""
    return PAPER_DECAY_EPOCHS * epochs / PAPER_EPOCHS


def auto_bn_momentum(total_steps: int) -> float:
    """0 (the model's TF 0.99) on runs of 5,000 steps or more; 50/steps, at most 0.1, on shorter ones."""
    m = BN_WINDOW_STEPS / max(1, total_steps)
    return min(0.1, m) if m > TF_BN_MOMENTUM else 0.0


def typical_side(view: SplitView) -> int | None:
    """Median longer side of the split's images, px, from the json members of its first samples (None: no
    samples). The recorded size is the stored image's (after build-shards' --max-side)."""
    if not view.info.shards:
        return None
    metas = itertools.islice(iter_meta(view.shard_urls[0], view.index_urls[0]), SIDE_SAMPLE)
    sides = [max(m["width"], m["height"]) for m in metas]
    return int(statistics.median(sides)) if sides else None


def capped_sizes(preset: Preset, side: int | None, stride: int = STRIDE) -> tuple[int, int] | None:
    """(min, max) train sizes for data whose images are `side` px: the preset's, capped at the images' own size
    (rounded down to 8) with the preset's min/max ratio kept (S: 128/300), but the first stage above the model's
    stride where the images allow (at `stride` px the deepest maps are 1x1: docs/training.md, "The digits");
    None when the preset already fits."""
    if side is None or preset.max_size <= side:
        return None
    top = max(SIZE_MULTIPLE, side // SIZE_MULTIPLE * SIZE_MULTIPLE)
    low = max(SIZE_MULTIPLE, round(top * preset.min_size / preset.max_size / SIZE_MULTIPLE) * SIZE_MULTIPLE)
    return min(top, max(low, stride + SIZE_MULTIPLE)), top


def global_batch(cfg: Config, world_size: int) -> int:
    """Images per optimizer step over all ranks: optim.batch_per_rank x world, or optim.batch_size (resolved:
    `train/preflight.py` has replaced an auto 0)."""
    if cfg.optim.batch_per_rank > 0:
        return cfg.optim.batch_per_rank * world_size
    if cfg.optim.batch_size % world_size:
        sizes = ", ".join(map(str, world_sizes_for(cfg.optim.batch_size)))
        raise ConfigError(f"optim.batch_size={cfg.optim.batch_size} (global) does not split over {world_size} "
                          f"processes: run on a world size dividing it ({sizes})")
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


def train_augment(cfg: Config) -> AugmentSpec:
    """The train loader's AugmentSpec (which checks its own values: preflight builds it too)."""
    return AugmentSpec(scale=cfg.data.crop_scale, hflip_prob=cfg.data.hflip_prob, mean=cfg.data.mean,
                       std=cfg.data.std, channels_last=cfg.model.channels_last)


def eval_augment(cfg: Config, crop: float) -> AugmentSpec:
    return AugmentSpec(crop_pct=crop, mean=cfg.data.mean, std=cfg.data.std, channels_last=cfg.model.channels_last)


def read_spec(cfg: Config) -> ReadSpec:
    return ReadSpec(on_error=cfg.data.on_error)


def train_loader(cfg: Config, stage: StagePlan, d: Dist) -> Loader:
    augment = train_augment(cfg)
    return Loader(cfg.data.url, split=cfg.data.train_split, batch_size=stage.batch_size // d.world_size,
                  stage=stage_params(stage, cfg), device=loader_device(cfg, d), train=True,
                  seed=cfg.run.seed, rank=d.rank, world_size=d.world_size,
                  num_threads=cfg.data.num_threads or None, augment=augment,
                  reading=read_spec(cfg), engine=engine_spec(cfg))


def engine_spec(cfg: Config) -> EngineSpec:
    return EngineSpec(host_decode=CPU_DECODERS[cfg.data.cpu_decoder])


def eval_loader(cfg: Config, size: int, crop: float, batch: int, d: Dist) -> Loader:
    return Loader(cfg.data.url, split=cfg.data.val_split, batch_size=max(1, batch // d.world_size),
                  stage=StageParams(image_size=size), device=loader_device(cfg, d), train=False, seed=cfg.run.seed,
                  rank=d.rank, world_size=d.world_size, num_threads=cfg.data.num_threads or None,
                  augment=eval_augment(cfg, crop), reading=read_spec(cfg), engine=engine_spec(cfg))
