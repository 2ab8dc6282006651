"""The paper's optimizer and learning-rate schedule (§5.1): TF-semantics RMSProp, linear LR scaling, warm-up, decay.

RMSProp as TensorFlow's `tf.compat.v1.train.RMSPropOptimizer`, which the
official efficientnetv2 code (utils.build_optimizer) uses, differs from
`torch.optim.RMSprop` in two ways that matter with eps = 1e-3:
  - eps is added inside the square root: lr * g / sqrt(ms + eps), not lr * g / (sqrt(ms) + eps);
  - the squared-gradient average starts at 1, not 0, so the first steps are not huge.
Momentum accumulates the already-scaled step: mom = m * mom + lr * g / sqrt(ms + eps); p -= mom.
Weight decay is the official L2 loss wd * sum(w^2) / 2, i.e. `g += wd * w`, on
conv and linear weights only (official weight_decay_exclude: bias, gamma, beta).
"""
from __future__ import annotations

import math

import torch
from torch import nn


class RMSpropTF(torch.optim.Optimizer):
    """RMSProp with TF1 semantics (see the module docstring)."""

    def __init__(self, params, lr: float, decay: float = 0.9, momentum: float = 0.9, eps: float = 1e-3,
                 weight_decay: float = 0.0) -> None:
        if lr < 0 or eps <= 0 or not 0 <= decay < 1 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(f"bad RMSpropTF settings: lr={lr} decay={decay} momentum={momentum} eps={eps} "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, decay=decay, momentum=momentum, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            ms, mom = [], []
            for p in params:
                state = self.state[p]
                if not state:
                    state["ms"] = torch.ones_like(p, memory_format=torch.preserve_format)  # TF initializes to 1
                    state["mom"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                ms.append(state["ms"])
                mom.append(state["mom"])
            # ms = decay * ms + (1 - decay) * g^2 (TF writes ms += (1 - decay) * (g^2 - ms): equal up to rounding)
            torch._foreach_mul_(ms, group["decay"])
            torch._foreach_addcmul_(ms, grads, grads, value=1.0 - group["decay"])
            denom = torch._foreach_add(ms, group["eps"])  # eps inside the square root
            torch._foreach_sqrt_(denom)
            torch._foreach_mul_(mom, group["momentum"])
            torch._foreach_addcdiv_(mom, grads, denom, value=group["lr"])
            torch._foreach_sub_(params, mom)
        return None


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: conv/linear weights with weight decay; BN parameters and biases (ndim <= 1) without."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, name: str, *, lr: float, weight_decay: float, momentum: float,
                    rmsprop_decay: float, eps: float) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    if name == "rmsprop_tf":
        return RMSpropTF(groups, lr=lr, decay=rmsprop_decay, momentum=momentum, eps=eps)
    if name == "momentum":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    raise ValueError(f"unknown optimizer {name!r}; choose rmsprop_tf or momentum")


def scaled_lr(lr: float, lr_batch: int, global_batch: int) -> float:
    """Linear scaling: `lr` per `lr_batch` images (paper: 0.256 per 4096) at `global_batch` images per step."""
    return lr * global_batch / lr_batch


def learning_rate(epoch: float, *, peak: float, warmup_epochs: float, decay: str, total_epochs: float,
                  decay_rate: float = 0.97, decay_epochs: float = 2.4) -> float:
    """LR at fractional `epoch` (official WarmupLearningRateSchedule, written per epoch instead of per step).

    Warm-up: linear from 0 to `peak` over `warmup_epochs`. After it:
    exponential, peak * decay_rate ** floor(epoch / decay_epochs) (staircase,
    counted from epoch 0 as in the official code); or cosine,
    peak * (1 + cos(pi * epoch / total_epochs)) / 2. Counting in epochs keeps the
    schedule right when the batch size changes between stages.
    """
    if warmup_epochs > 0 and epoch < warmup_epochs:
        return peak * epoch / warmup_epochs
    if decay == "exponential":
        return peak * decay_rate ** math.floor(epoch / decay_epochs)
    if decay == "cosine":
        return 0.5 * peak * (1.0 + math.cos(math.pi * min(epoch, total_epochs) / total_epochs))
    raise ValueError(f"unknown lr decay {decay!r}; choose exponential or cosine")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
