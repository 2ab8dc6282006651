"""Mixup and CutMix: per-batch draws in Python, image mixing in DALI, target mixing in numpy.

Per global step, as timm and the reference do per batch: lambda ~ Beta(alpha, alpha)
from the step's generator (the same on every rank), and one permutation of the rank's
own samples from a generator of the step and the rank's slots (partners stay within a
rank's slice, so they depend on the world size; a resumed run on the same world size
mixes the same pairs); targets become lam * t + (1 - lam) * t[perm]. With CutMix (chosen with
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

from stagewise.loaders.inputs import MIX_ANCHORS, MIX_IDS, MIX_KIND, MIX_LAM, MIX_PERM, MIX_SHAPES
from stagewise.loaders.params import StageParams

MIX_STREAM, MIX_PARTNER_STREAM = 4, 5  # generator stream ids, see feed.batch_rng
NONE, MIXUP, CUTMIX = 0, 1, 2


@dataclass(frozen=True)
class MixParams:
    kind: int  # NONE, MIXUP or CUTMIX, for the whole batch
    lam: float  # weight of each sample's own image and target
    perm: np.ndarray  # int32 [N]: sample i is mixed with sample perm[i]
    box: tuple[int, int, int, int]  # CutMix (y, x, h, w) in output pixels; zeros otherwise


def draw_mix(rng: np.random.Generator, partners: np.random.Generator, n: int, size: int,
             stage: StageParams) -> MixParams:
    """The step's draws from `rng`, always in the same order (the Beta draw last), whatever the stage;
    the n samples' partners from `partners`."""
    choose_cutmix = rng.random() < stage.cutmix_prob
    perm = partners.permutation(n).astype(np.int32)
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


def soft_targets(labels: list[tuple[int, ...]], num_classes: int, smoothing: float) -> np.ndarray:
    """float32 [N, K] rows summing to 1: one-hot, or multi-hot / count for multi-label samples; then smoothing.

    numpy, not torch: for these small arrays a numpy op costs ~1-3 us against ~10-20 us for a
    torch op; the float32 arithmetic is the same, so the values are the same bytes.
    """
    rows = np.zeros((len(labels), num_classes), np.float32)
    if all(len(row) == 1 for row in labels):
        rows[np.arange(len(labels)), [row[0] for row in labels]] = 1.0
    else:
        for i, row in enumerate(labels):
            rows[i, list(row)] = 1.0 / len(row)
    if smoothing > 0:
        rows = rows * np.float32(1.0 - smoothing) + np.float32(smoothing / num_classes)
    return rows


def mix_targets(targets: np.ndarray, mix: MixParams) -> np.ndarray:
    if mix.kind == NONE:
        return targets
    return targets * np.float32(mix.lam) + targets[mix.perm] * np.float32(1.0 - mix.lam)


def mixed_targets(labels: list[tuple[int, ...]], num_classes: int, smoothing: float, mix: MixParams | None) -> np.ndarray:
    """`mix_targets(soft_targets(...), mix)`, the same bytes, in one fill and two scatters for single labels.

    A single-label row holds only two values before mixing (the label's and the rest's), so a
    mixed row holds at most four, one per (own, partner) pair; they are computed with the same
    float32 operations and written where they belong. Measured at batch 256, 1000 classes:
    0.95 ms for the straightforward version, ~0.1 ms for this one (tests compare the two).
    """
    if any(len(row) != 1 for row in labels):
        targets = soft_targets(labels, num_classes, smoothing)
        return mix_targets(targets, mix) if mix is not None else targets
    n = len(labels)
    own = np.array([row[0] for row in labels], np.intp)
    values = np.array([0.0, 1.0], np.float32)  # [rest, label] before smoothing
    if smoothing > 0:
        values = values * np.float32(1.0 - smoothing) + np.float32(smoothing / num_classes)
    rows = np.arange(n)
    if mix is None or mix.kind == NONE:
        out = np.full((n, num_classes), values[0], np.float32)
        out[rows, own] = values[1]
        return out
    pairs = values[:, None] * np.float32(mix.lam) + values[None, :] * np.float32(1.0 - mix.lam)  # [own?, partner?]
    partner = own[mix.perm]
    same = (partner == own).astype(np.intp)
    out = np.full((n, num_classes), pairs[0, 0], np.float32)
    out[rows, own] = pairs[1, same]
    out[rows, partner] = pairs[same, 1]
    return out


def mix_feeds(mix: MixParams, n: int, size: int, branchless: bool) -> dict[str, np.ndarray]:
    """The per-sample inputs of `ops.mix` / `ops.mix_branchless` (fresh arrays: they are fed with no_copy).

    `mix_perm` drives `permute_batch`: the drawn permutation for mixup, the identity otherwise,
    so that the branchless graph's blend is an exact no-op on batches that do not mix (the
    tree uses it only in its mixup branch, so its output does not change).
    """
    y, x, h, w = mix.box
    rows = np.arange(n, dtype=np.int32)
    out = {
        MIX_LAM: np.full(n, mix.lam if mix.kind == MIXUP else 1.0, np.float32),
        MIX_PERM: mix.perm.copy() if mix.kind == MIXUP else rows,
        # CutMix as two pastes per output: the sample itself, whole, then the partner's box in place
        # (an empty box when the batch does not use CutMix: an exact copy).
        MIX_IDS: np.stack([rows, mix.perm], axis=1),
        MIX_ANCHORS: np.tile(np.array([[0, 0], [y, x]], np.int32), (n, 1, 1)),
        MIX_SHAPES: np.tile(np.array([[size, size], [h, w]], np.int32), (n, 1, 1)),
    }
    if not branchless:
        out[MIX_KIND] = np.full(n, mix.kind, np.int32)
        out[MIX_LAM] = np.full(n, mix.lam, np.float32)
    return out


def feed_mix(pipe, mix: MixParams, n: int, size: int) -> None:
    """Feeds the tree variant's mix inputs (bench-loader's --mixup section)."""
    for name, array in mix_feeds(mix, n, size, branchless=False).items():
        pipe.feed_input(name, array)
