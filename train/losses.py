"""Training loss and accuracy: hard labels, soft (mixed or smoothed) targets, multi-label ImageNet-21k.

The loader emits int64 labels when nothing mixes or smooths them, and float
rows summing to 1 otherwise (mixup/cutmix, label smoothing it applied itself,
or multi-label samples). Smoothing is therefore applied here only to int64
targets, so it never happens twice. Multi-label samples (paper §5.2) are
multi-hot rows normalized to sum 1 under a softmax cross-entropy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Mean cross-entropy; `label_smoothing` applies to int64 targets only (soft ones arrive smoothed)."""
    logits = logits.float()  # the loss in fp32 under bf16 autocast
    if targets.dtype == torch.int64:
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    if targets.dim() != 2 or targets.shape != logits.shape:
        raise ValueError(f"soft targets must be [N, {logits.shape[1]}], got {tuple(targets.shape)}")
    return soft_cross_entropy(logits, targets)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-(t * log_softmax(z)).sum(1), averaged over the batch; t rows sum to 1."""
    return -(targets.float() * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


@torch.no_grad()
def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> tuple[torch.Tensor, ...]:
    """Per-k counts of correct predictions, and the number of counted samples (targets of -1 are padding)."""
    valid = targets >= 0
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices
    hit = top.eq(targets.unsqueeze(1)) & valid.unsqueeze(1)
    counts = [hit[:, : min(k, k_max)].any(dim=1).sum() for k in ks]
    return (*counts, valid.sum())
