"""The EfficientNet / EfficientNetV2 network, built from a `Variant` row, with run-time dropout and drop-path.

`create_model(name)` is the public entry point. `EfficientNet.__init__` is the
single builder: stem, the block groups, head. The trainer changes the
regularization between progressive-learning stages with `set_dropout` and
`set_drop_path`; the current values are `dropout_rate` and `drop_path_rate`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stagewise.model.layers import ConvBnAct, FusedMBConv, MBConv
from stagewise.model.variants import Variant, get_variant

# Paper §5.1 / V1 official: stochastic depth with survival probability 0.8.
DEFAULT_DROP_PATH_RATE = 0.2


class EfficientNet(nn.Module):
    """Stem (3x3 s2 conv) -> MBConv / Fused-MBConv block groups -> 1x1 head conv -> mean pool -> dropout -> linear."""

    def __init__(self, variant: Variant, num_classes: int, dropout: float, drop_path_rate: float,
                 tf_same_padding: bool) -> None:
        super().__init__()
        self.variant = variant
        self.num_classes = num_classes
        self.stem = ConvBnAct(3, variant.stem_ch, 3, 2, 1, act=True, tf_same=tf_same_padding)
        blocks: list[nn.Module] = []
        in_ch = variant.stem_ch
        for group in variant.groups:
            for i in range(group.repeats):
                stride = group.stride if i == 0 else 1  # only a group's first block downsamples
                if group.block == "fused":
                    block: nn.Module = FusedMBConv(in_ch, group.out_ch, group.kernel, stride, group.expand,
                                                   drop_path_rate=0.0, tf_same=tf_same_padding)
                else:
                    block = MBConv(in_ch, group.out_ch, group.kernel, stride, group.expand, group.se_ratio,
                                   drop_path_rate=0.0, tf_same=tf_same_padding)
                blocks.append(block)
                in_ch = group.out_ch
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBnAct(in_ch, variant.head_ch, 1, 1, 1, act=True, tf_same=tf_same_padding)
        self.classifier = nn.Linear(variant.head_ch, num_classes)
        self.num_features = variant.head_ch
        self._init_weights()
        self.set_dropout(dropout)
        self.set_drop_path(drop_path_rate)

    def _init_weights(self) -> None:
        # Official conv_kernel_initializer / dense_kernel_initializer.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # normal(0, sqrt(2/fan_out)), fan_out = k*k*out/groups (TF: k*k*multiplier for depthwise).
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)  # uniform(+-1/sqrt(out))
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    @property
    def dropout_rate(self) -> float:
        """Current dropout probability before the classifier."""
        return self._dropout_rate

    @property
    def drop_path_rate(self) -> float:
        """Current stochastic-depth rate (1 - survival probability) that the block rates are scaled from."""
        return self._drop_path_rate

    def set_dropout(self, p: float) -> None:
        """Set the pre-classifier dropout probability, used from the next training forward."""
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self._dropout_rate = float(p)

    def set_drop_path(self, rate: float) -> None:
        """Set the stochastic-depth rate: block i of N drops its residual branch with probability rate*i/N.

        Linear in the block index as in the official code (block 0 never drops,
        the last block drops with rate*(N-1)/N).
        """
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {rate}")
        self._drop_path_rate = float(rate)
        n = len(self.blocks)
        for i, block in enumerate(self.blocks):
            block.drop_path_rate = rate * i / n

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) -> head activations (N, head_ch, H/32, W/32)."""
        return self.head(self.blocks(self.stem(x)))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Head activations -> logits (N, num_classes)."""
        x = x.mean((2, 3))
        x = F.dropout(x, p=self._dropout_rate, training=self.training)
        return self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def create_model(name: str, num_classes: int = 1000, dropout: float | None = None,
                 drop_path_rate: float | None = None, tf_same_padding: bool = False) -> EfficientNet:
    """Build the named variant (see `list_models()`).

    dropout: pre-classifier dropout; None = the variant's final training
        value from its table row.
    drop_path_rate: stochastic-depth rate; None = 0.2 (survival 0.8).
    tf_same_padding: TF "SAME" padding for strided convs, to run weights
        ported from TF; the default symmetric padding is faster.
    """
    variant = get_variant(name)
    return EfficientNet(
        variant,
        num_classes=num_classes,
        dropout=variant.dropout if dropout is None else dropout,
        drop_path_rate=DEFAULT_DROP_PATH_RATE if drop_path_rate is None else drop_path_rate,
        tf_same_padding=tf_same_padding,
    )
