"""Mixup and CutMix: per-batch draws in Python, image mixing in DALI, target mixing in torch.

Per batch, as timm and the reference do: lambda ~ Beta(alpha, alpha) and one
permutation, both from the batch's generator (so a resumed run mixes the same
pairs); targets become lam * t + (1 - lam) * t[perm]. With CutMix (chosen with
probability `cutmix_prob` when both are on) a box covering about 1 - lam of the
image is pasted from the partner and lam is corrected to the area pasted.

Why the images are mixed inside DALI: measured on the 2-core CPU machine
(`pipeline bench-loader --mixup`, docs/loader.md), mixing a batch of 64 with DALI
ops (permute_batch + one arithmetic pass; multi_paste for CutMix) cost about half
of doing it in torch on the output tensor (an index copy + lerp in the caller's
thread, where torch's OpenMP threads also fight DALI's). On GPU the choice awaits
a GPU to measure; the same DALI ops run there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from stagewise.loaders.params import StageParams

MIX_STREAM = 4  # generator stream id, see runner.batch_rng
NONE, MIXUP, CUTMIX = 0, 1, 2


@dataclass(frozen=True)
class MixParams:
    kind: int  # NONE, MIXUP or CUTMIX, for the whole batch
    lam: float  # weight of each sample's own image and target
    perm: np.ndarray  # int32 [N]: sample i is mixed with sample perm[i]
    box: tuple[int, int, int, int]  # CutMix (y, x, h, w) in output pixels; zeros otherwise


def draw_mix(rng: np.random.Generator, n: int, size: int, stage: StageParams) -> MixParams:
    """The batch's draws, always in the same order (the Beta draw last), whatever the stage."""
    choose_cutmix = rng.random() < stage.cutmix_prob
    perm = rng.permutation(n).astype(np.int32)
    centre = rng.random(2)
    if not stage.mixing_on:
        return MixParams(NONE, 1.0, perm, (0, 0, 0, 0))
    use_cutmix = stage.cutmix_alpha > 0 and (stage.mixup_alpha <= 0 or choose_cutmix)
    alpha = stage.cutmix_alpha if use_cutmix else stage.mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    if not use_cutmix:
        return MixParams(MIXUP, lam, perm, (0, 0, 0, 0))
    cut = int(size * math.sqrt(1.0 - lam))  # box side so that its area is about (1 - lam)
    cy, cx = int(centre[0] * size), int(centre[1] * size)
    y0, y1 = max(cy - cut // 2, 0), min(cy + cut // 2, size)
    x0, x1 = max(cx - cut // 2, 0), min(cx + cut // 2, size)
    lam = 1.0 - (y1 - y0) * (x1 - x0) / float(size * size)  # the area actually pasted
    return MixParams(CUTMIX, lam, perm, (y0, x0, y1 - y0, x1 - x0))


def soft_targets(labels: list[tuple[int, ...]], num_classes: int, smoothing: float, device: torch.device) -> torch.Tensor:
    """float32 [N, K] rows summing to 1: one-hot, or multi-hot / count for multi-label samples; then smoothing."""
    rows = torch.zeros((len(labels), num_classes), dtype=torch.float32)
    for i, row in enumerate(labels):
        rows[i, list(row)] = 1.0 / len(row)
    if smoothing > 0:
        rows = rows * (1.0 - smoothing) + smoothing / num_classes
    return rows.to(device)


def mix_targets(targets: torch.Tensor, mix: MixParams) -> torch.Tensor:
    if mix.kind == NONE:
        return targets
    perm = torch.from_numpy(mix.perm.astype(np.int64)).to(targets.device)
    return targets * mix.lam + targets[perm] * (1.0 - mix.lam)


def feed_mix(pipe, mix: MixParams, n: int, size: int) -> None:
    """The per-sample inputs of `ops.mix` (every sample carries its batch's kind and lambda)."""
    y, x, h, w = mix.box
    pipe.feed_input("mix_kind", np.full(n, mix.kind, np.int32))
    pipe.feed_input("mix_lam", np.full(n, mix.lam, np.float32))
    pipe.feed_input("mix_perm", mix.perm)
    # CutMix as two pastes per output: the sample itself, whole, then the partner's box in place.
    pipe.feed_input("mix_ids", np.stack([np.arange(n, dtype=np.int32), mix.perm], axis=1))
    pipe.feed_input("mix_anchors", np.tile(np.array([[0, 0], [y, x]], np.int32), (n, 1, 1)))
    pipe.feed_input("mix_shapes", np.tile(np.array([[size, size], [h, w]], np.int32), (n, 1, 1)))
