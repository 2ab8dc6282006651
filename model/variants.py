"""The EfficientNet / EfficientNetV2 variants, declared as data.

Each variant is one frozen `Variant` row: its stem width, its block groups (one
frozen `BlockGroup` each), its head width, and the training targets the trainer
and the loader read (image sizes, eval crop, final RandAugment magnitude,
mixup alpha, dropout). The network builder (`model.net`) reads nothing else.

Sources, named again at each value:
- V2-S: paper Table 4 (= official config `v2_s_block`).
- V2-M/L/XL and V2-B0 (base): official `efficientnetv2/effnetv2_configs.py`.
- V1-B0: official `v1_b0_block_str`; V1 paper Table 1.
- Compound scaling (V1 B1..B7, V2-B1..B3): width/depth coefficients from the
  official configs, channels rounded to multiples of 8 and repeats by `ceil`,
  computed below (not hand-typed).
- Final training targets: paper Table 6 (S/M/L), official configs for the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

BlockType = Literal["fused", "mbconv"]


@dataclass(frozen=True)
class BlockGroup:
    """One group of blocks (the papers' "stage"; here that word means a training stage): `repeats` blocks;
    only the first has `stride` and changes width."""

    block: BlockType  # "fused": Fused-MBConv (no depthwise); "mbconv": MBConv
    repeats: int
    kernel: int  # square kernel side, pixels
    stride: int  # of the first block
    expand: int  # expansion ratio; 1 = no expansion conv
    out_ch: int  # output channels
    se_ratio: float  # SE width as a fraction of the block's *input* channels; 0 = no SE


@dataclass(frozen=True)
class Variant:
    """One row of the table: architecture and training targets of a named model."""

    name: str
    family: Literal["v1", "v2"]
    width_mult: float  # compound-scaling width coefficient applied to the base config
    depth_mult: float  # compound-scaling depth coefficient applied to the base config
    stem_ch: int  # channels of the stride-2 3x3 stem conv
    groups: tuple[BlockGroup, ...]
    head_ch: int  # channels of the final 1x1 conv before pooling
    train_size: int  # final (largest) training image size, pixels
    eval_size: int  # test image size, pixels
    eval_crop_pct: float  # center-crop fraction at eval (1.0 = resize the whole image)
    randaug_magnitude: int  # final RandAugment magnitude; 0 = no RandAugment
    mixup_alpha: float  # final mixup alpha; 0 = no mixup
    dropout: float  # final dropout before the classifier

    @property
    def stride(self) -> int:
        """Input pixels per pixel of the last feature map: the stem's 2 times every group's stride (32)."""
        return 2 * math.prod(g.stride for g in self.groups)


# --- Base block-group tables -------------------------------------------------------
# Abbreviations: F = Fused-MBConv, M = MBConv. Columns: repeats, kernel, stride,
# expansion, output channels, SE ratio.


def _f(r: int, k: int, s: int, e: int, c: int) -> BlockGroup:
    return BlockGroup("fused", r, k, s, e, c, 0.0)


def _m(r: int, k: int, s: int, e: int, c: int, se: float = 0.25) -> BlockGroup:
    return BlockGroup("mbconv", r, k, s, e, c, se)


# EfficientNet-B0: official v1_b0_block_str, V1 paper Table 1. Stem 32, head 1280.
V1_B0_GROUPS = (
    _m(1, 3, 1, 1, 16),
    _m(2, 3, 2, 6, 24),
    _m(2, 5, 2, 6, 40),
    _m(3, 3, 2, 6, 80),
    _m(3, 5, 1, 6, 112),
    _m(4, 5, 2, 6, 192),
    _m(1, 3, 1, 6, 320),
)

# EfficientNetV2 base (V2-B0): official v2_base_block. Stem 32, head 1280.
V2_BASE_GROUPS = (
    _f(1, 3, 1, 1, 16),
    _f(2, 3, 2, 4, 32),
    _f(2, 3, 2, 4, 48),
    _m(3, 3, 2, 4, 96),
    _m(5, 3, 1, 6, 112),
    _m(8, 3, 2, 6, 192),
)

# EfficientNetV2-S: paper Table 4 (identical to official v2_s_block). Stem 24.
# Built from it, S has 21.46M parameters at 1000 classes, as the official
# checkpoint; the paper's Tables 7 and 11 say 24M. We match the checkpoint.
V2_S_GROUPS = (
    _f(2, 3, 1, 1, 24),
    _f(4, 3, 2, 4, 48),
    _f(4, 3, 2, 4, 64),
    _m(6, 3, 2, 4, 128),
    _m(9, 3, 1, 6, 160),
    _m(15, 3, 2, 6, 256),
)

# EfficientNetV2-M: official v2_m_block (adds a 7th group, 512 ch). Stem 24.
V2_M_GROUPS = (
    _f(3, 3, 1, 1, 24),
    _f(5, 3, 2, 4, 48),
    _f(5, 3, 2, 4, 80),
    _m(7, 3, 2, 4, 160),
    _m(14, 3, 1, 6, 176),
    _m(18, 3, 2, 6, 304),
    _m(5, 3, 1, 6, 512),
)

# EfficientNetV2-L: official v2_l_block (7th group with 640 ch). Stem 32.
V2_L_GROUPS = (
    _f(4, 3, 1, 1, 32),
    _f(7, 3, 2, 4, 64),
    _f(7, 3, 2, 4, 96),
    _m(10, 3, 2, 4, 192),
    _m(19, 3, 1, 6, 224),
    _m(25, 3, 2, 6, 384),
    _m(7, 3, 1, 6, 640),
)

# EfficientNetV2-XL: official v2_xl_block ("only for 21k pretraining"). Stem 32.
V2_XL_GROUPS = (
    _f(4, 3, 1, 1, 32),
    _f(8, 3, 2, 4, 64),
    _f(8, 3, 2, 4, 96),
    _m(16, 3, 2, 4, 192),
    _m(24, 3, 1, 6, 256),
    _m(32, 3, 2, 6, 512),
    _m(8, 3, 1, 6, 640),
)


# --- Compound scaling ---------------------------------------------------------

CHANNEL_DIVISOR = 8  # official depth_divisor / min_depth


def round_channels(channels: int, width_mult: float, limit_10pct: bool) -> int:
    """Scale `channels` by `width_mult`, rounded to the nearest multiple of 8.

    `limit_10pct`: V1's official round_filters adds 8 back when rounding lost
    more than 10%; V2's official round_filters does not. It matters once, for
    V2-B3's first group (16 * 1.2 = 19.2 -> 16 in V2, 24 under the V1 rule).
    """
    scaled = channels * width_mult
    rounded = max(CHANNEL_DIVISOR, int(scaled + CHANNEL_DIVISOR / 2) // CHANNEL_DIVISOR * CHANNEL_DIVISOR)
    if limit_10pct and rounded < 0.9 * scaled:
        rounded += CHANNEL_DIVISOR
    return rounded


def round_repeats(repeats: int, depth_mult: float) -> int:
    """Scale a group's block count by `depth_mult`, rounding up (official round_repeats)."""
    return int(math.ceil(depth_mult * repeats))


def scale_groups(groups: tuple[BlockGroup, ...], width_mult: float, depth_mult: float,
                 limit_10pct: bool) -> tuple[BlockGroup, ...]:
    return tuple(
        replace(
            st,
            out_ch=round_channels(st.out_ch, width_mult, limit_10pct),
            repeats=round_repeats(st.repeats, depth_mult),
        )
        for st in groups
    )


def _legacy_crop(size: int) -> float:
    # Official V1 eval (and V2's preprocess_legacy / preprocess_for_eval below
    # 320 px): center crop of size/(size+32) of the short side, then resize.
    return size / (size + 32)


def _v1(name: str, width: float, depth: float, size: int, dropout: float) -> Variant:
    # Official efficientnetv1_params: (width, depth, resolution, dropout);
    # V1 paper §5.2: dropout 0.2 (B0) to 0.5 (B7), fixed AutoAugment (so no
    # RandAugment magnitude), no mixup. The original V1 code trains at the
    # resolution; the V2 repo's V1 config trains at 0.8x it (train isize=0.8),
    # which we do not copy.
    return Variant(
        name=name,
        family="v1",
        width_mult=width,
        depth_mult=depth,
        stem_ch=round_channels(32, width, limit_10pct=True),
        groups=scale_groups(V1_B0_GROUPS, width, depth, limit_10pct=True),
        head_ch=round_channels(1280, width, limit_10pct=True),  # V1 head scales with width
        train_size=size,
        eval_size=size,
        eval_crop_pct=_legacy_crop(size),
        randaug_magnitude=0,
        mixup_alpha=0.0,
        dropout=dropout,
    )


def _v2_base(name: str, width: float, depth: float, train: int, test: int, dropout: float) -> Variant:
    # Official efficientnetv2_params for efficientnetv2-b0..b3: V2 base block
    # scaled like V1 (paper Table 11), trained with V1's AutoAugment
    # ('effnetv1_autoaug', so no RandAugment magnitude) and no mixup.
    return Variant(
        name=name,
        family="v2",
        width_mult=width,
        depth_mult=depth,
        stem_ch=round_channels(32, width, limit_10pct=False),
        groups=scale_groups(V2_BASE_GROUPS, width, depth, limit_10pct=False),
        head_ch=round_channels(1280, width, limit_10pct=False),  # official Head: round_filters(1280)
        train_size=train,
        eval_size=test,
        eval_crop_pct=_legacy_crop(test),
        randaug_magnitude=0,
        mixup_alpha=0.0,
        dropout=dropout,
    )


def _v2(name: str, stem: int, groups: tuple[BlockGroup, ...], train: int, test: int,
        randaug: int, mixup: float, dropout: float) -> Variant:
    # S/M/L/XL are hand-designed (width = depth = 1.0); head 1280. Eval at
    # >= 320 px resizes the whole image (official preprocess_for_eval): crop 1.0.
    return Variant(
        name=name,
        family="v2",
        width_mult=1.0,
        depth_mult=1.0,
        stem_ch=stem,
        groups=groups,
        head_ch=1280,
        train_size=train,
        eval_size=test,
        eval_crop_pct=1.0,
        randaug_magnitude=randaug,
        mixup_alpha=mixup,
        dropout=dropout,
    )


_ROWS = (
    # S/M/L final values: paper Table 6 (max column; the min column is FirstStage
    # below). The official configs differ: S dropout 0.2 / RandAugment 10; M train
    # 384, dropout 0.3, RA 15; L train 384, dropout 0.4, RA 20, mixup 0.5. We
    # follow the paper, from which the trainer's presets derive. Eval sizes:
    # official configs.
    _v2("efficientnetv2_s", 24, V2_S_GROUPS, train=300, test=384, randaug=15, mixup=0.0, dropout=0.3),
    _v2("efficientnetv2_m", 24, V2_M_GROUPS, train=380, test=480, randaug=20, mixup=0.2, dropout=0.4),
    _v2("efficientnetv2_l", 32, V2_L_GROUPS, train=380, test=480, randaug=25, mixup=0.4, dropout=0.5),
    # XL is not in Table 6: official config (384, 512, dropout 0.4, RA 20, mixup 0.5).
    _v2("efficientnetv2_xl", 32, V2_XL_GROUPS, train=384, test=512, randaug=20, mixup=0.5, dropout=0.4),
    # V2-B0..B3, official configs: (width, depth, train, test, dropout).
    _v2_base("efficientnetv2_b0", 1.0, 1.0, 192, 224, 0.2),
    _v2_base("efficientnetv2_b1", 1.0, 1.1, 192, 240, 0.2),
    _v2_base("efficientnetv2_b2", 1.1, 1.2, 208, 260, 0.3),
    _v2_base("efficientnetv2_b3", 1.2, 1.4, 240, 300, 0.3),
    # V1, official efficientnetv1_params: (width, depth, resolution, dropout).
    _v1("efficientnet_b0", 1.0, 1.0, 224, 0.2),
    _v1("efficientnet_b1", 1.0, 1.1, 240, 0.2),
    _v1("efficientnet_b2", 1.1, 1.2, 260, 0.3),
    _v1("efficientnet_b3", 1.2, 1.4, 300, 0.3),
    _v1("efficientnet_b4", 1.4, 1.8, 380, 0.4),
    _v1("efficientnet_b5", 1.6, 2.2, 456, 0.4),
    _v1("efficientnet_b6", 1.8, 2.6, 528, 0.5),
    _v1("efficientnet_b7", 2.0, 3.1, 600, 0.5),
)

VARIANTS: dict[str, Variant] = {row.name: row for row in _ROWS}


@dataclass(frozen=True)
class FirstStage:
    """Paper Table 6's "min" column: what progressive learning's first stage uses, shared by every model.

    The "max" column is each row's own train_size, randaug_magnitude, mixup_alpha
    and dropout, so Table 6 is stored once: these values plus the S/M/L rows.
    """

    image_size: int = 128  # px
    randaug_magnitude: float = 5.0
    mixup_alpha: float = 0.0
    dropout: float = 0.1


TABLE_6_FIRST_STAGE = FirstStage()
TABLE_6_MODELS = ("efficientnetv2_s", "efficientnetv2_m", "efficientnetv2_l")  # the rows Table 6 lists


def list_models() -> list[str]:
    """Names accepted by `create_model`, in table order."""
    return list(VARIANTS)


def get_variant(name: str) -> Variant:
    """The frozen table row for `name`; ValueError names the valid choices."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(VARIANTS)}") from None
