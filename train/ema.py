"""Exponential moving average of the weights (paper §5.1: decay 0.9999), evaluated at stage ends.

As TF's `ExponentialMovingAverage(decay, num_updates=global_step)` in the
official code: the decay actually used at update t is min(decay, (1+t)/(10+t)),
so a short run (or the start of a long one) is not dominated by the random
initialization. Parameters and floating-point buffers (BN running statistics)
are averaged; integer buffers (BN's batch counter) are copied.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """A frozen copy of the model whose weights follow the trained ones."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        self.updates = 0

    def decay_at(self, t: int) -> float:
        """Decay used by update number t (1-based)."""
        return min(self.decay, (1.0 + t) / (10.0 + t)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay_at(self.updates)
        ema_state = self.module.state_dict()
        floats_ema, floats_new = [], []
        for name, value in model.state_dict().items():
            target = ema_state[name]
            if target.is_floating_point():
                floats_ema.append(target)
                floats_new.append(value.detach().to(target.dtype))
            else:
                target.copy_(value)
        torch._foreach_lerp_(floats_ema, floats_new, 1.0 - d)  # ema = d * ema + (1 - d) * w

    def state_dict(self) -> dict:
        return {"updates": self.updates, "weights": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        self.module.load_state_dict(state["weights"])
