"""Building blocks of EfficientNet / EfficientNetV2: conv+BN+SiLU, SE, drop path, MBConv, Fused-MBConv.

Every module takes explicit, typed arguments. Forward passes hold no Python
shape logic (except TF "SAME" padding, which is opt-in for ported weights), so
they trace cleanly under `torch.compile` and run in channels_last and bf16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Paper §5.1 / V1 official: TF BN momentum 0.99 = PyTorch momentum 0.01, eps 1e-3.
# (The official V2 code's hparams default to TF momentum 0.9; the issue and the
# paper text say 0.99, which is what we use.)
BN_EPS = 1e-3
BN_MOMENTUM = 0.01


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding: total pad max((ceil(i/s)-1)*s + k - i, 0), extra pixel right/bottom.

    Only needed for strided convs: for stride 1 and odd kernels TF SAME equals
    symmetric padding k//2, which `conv2d` below uses. The pad depends on the
    input size, so this is the one place with per-call shape arithmetic.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        pad_h = _same_pad(int(ih), self.kernel_size[0], self.stride[0])
        pad_w = _same_pad(int(iw), self.kernel_size[1], self.stride[1])
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return super().forward(x)


def _same_pad(size: int, kernel: int, stride: int) -> int:
    return max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)


def conv2d(in_ch: int, out_ch: int, kernel: int, stride: int, groups: int, bias: bool, tf_same: bool) -> nn.Conv2d:
    """A square conv; symmetric padding k//2, or TF SAME when `tf_same` and strided."""
    if tf_same and stride > 1:
        return Conv2dSame(in_ch, out_ch, kernel, stride, padding=0, groups=groups, bias=bias)
    return nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, groups=groups, bias=bias)


class ConvBnAct(nn.Sequential):
    """conv -> BatchNorm -> optional SiLU. Conv has no bias (BN follows)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, groups: int, act: bool, tf_same: bool) -> None:
        super().__init__()
        self.conv = conv2d(in_ch, out_ch, kernel, stride, groups, bias=False, tf_same=tf_same)
        self.bn = nn.BatchNorm2d(out_ch, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.SiLU(inplace=True) if act else nn.Identity()


class SqueezeExcite(nn.Module):
    """SE: x * sigmoid(expand(silu(reduce(mean_hw(x))))), with 1x1 convs (official SE layer)."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.act = nn.SiLU(inplace=True)
        self.expand = nn.Conv2d(reduced, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = self.expand(self.act(self.reduce(s)))
        return x * s.sigmoid()


def add_residual(y: torch.Tensor, shortcut: torch.Tensor, drop_rate: float, training: bool) -> torch.Tensor:
    """shortcut + y, with stochastic depth on y in training: per sample, y is dropped with probability
    `drop_rate` and survivors are scaled by 1/(1-drop_rate) (official utils.drop_connect).

    y is a fresh BatchNorm output that BN's backward does not need, so the plain
    case adds in place (no extra activation-sized tensor); the drop case is one
    fused addcmul.
    """
    if training and drop_rate > 0.0:
        keep = 1.0 - drop_rate
        mask = torch.empty((y.shape[0], 1, 1, 1), dtype=y.dtype, device=y.device).bernoulli_(keep).div_(keep)
        return torch.addcmul(shortcut, y, mask)
    return y.add_(shortcut)


class MBConv(nn.Module):
    """Inverted residual: [1x1 expand] -> kxk depthwise -> SE -> 1x1 project (no act), + drop-path residual."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int,
                 se_ratio: float, drop_path_rate: float, tf_same: bool) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_residual = stride == 1 and in_ch == out_ch
        self.drop_path_rate = drop_path_rate  # changed at run time by EfficientNet.set_drop_path
        self.expand_conv = ConvBnAct(in_ch, mid, 1, 1, 1, act=True, tf_same=tf_same) if expand != 1 else nn.Identity()
        self.dw = ConvBnAct(mid, mid, kernel, stride, groups=mid, act=True, tf_same=tf_same)
        # SE width: fraction of the block's input channels (official MBConvBlock).
        self.se = SqueezeExcite(mid, max(1, int(in_ch * se_ratio))) if se_ratio > 0 else nn.Identity()
        self.project = ConvBnAct(mid, out_ch, 1, 1, 1, act=False, tf_same=tf_same)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.dw(self.expand_conv(x))))
        if self.has_residual:
            y = add_residual(y, x, self.drop_path_rate, self.training)
        return y


class FusedMBConv(nn.Module):
    """Fused-MBConv (paper Fig. 2): kxk conv expand -> 1x1 project; expand 1 = a single kxk conv+BN+SiLU. No SE."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int,
                 drop_path_rate: float, tf_same: bool) -> None:
        super().__init__()
        self.has_residual = stride == 1 and in_ch == out_ch
        self.drop_path_rate = drop_path_rate  # changed at run time by EfficientNet.set_drop_path
        if expand == 1:
            # Official FusedMBConvBlock: the project conv takes kernel and stride, and gets the activation.
            self.expand_conv = nn.Identity()
            self.project = ConvBnAct(in_ch, out_ch, kernel, stride, 1, act=True, tf_same=tf_same)
        else:
            self.expand_conv = ConvBnAct(in_ch, in_ch * expand, kernel, stride, 1, act=True, tf_same=tf_same)
            self.project = ConvBnAct(in_ch * expand, out_ch, 1, 1, 1, act=False, tf_same=tf_same)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.expand_conv(x))
        if self.has_residual:
            y = add_residual(y, x, self.drop_path_rate, self.training)
        return y
