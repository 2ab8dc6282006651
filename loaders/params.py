"""`StageParams`: what the loader needs to know about one progressive-learning stage.

The trainer owns the schedule (image size, RandAugment magnitude, mixup alpha per
stage, paper Table 6); the loader only receives the values and knows nothing
about models.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class StageParams:
    image_size: int  # output side, px (train: random-resized-crop size; eval: center-crop size)
    randaug_magnitude: float = 0.0  # reference (TF) scale: 0..~30, Table 6 uses 5..25; 0 turns RandAugment off
    mixup_alpha: float = 0.0  # Beta(alpha, alpha) per batch; 0 = off (an eval loader: StageParams(size) is all)
    randaug_ops: int = 2  # ops applied per image; 0 turns RandAugment off
    cutmix_alpha: float = 0.0  # 0 = off
    cutmix_prob: float = 0.5  # when both are on: probability that a batch uses cutmix instead of mixup
    label_smoothing: float = 0.0  # applied only when the loader emits soft targets

    def __post_init__(self) -> None:
        def bad(name: str, value: object, rule: str) -> ValueError:
            return ValueError(f"StageParams.{name}={value!r}: {rule}")

        if not isinstance(self.image_size, int) or isinstance(self.image_size, bool) or self.image_size < 8:
            raise bad("image_size", self.image_size, "must be an int >= 8 (pixels)")
        for name in ("randaug_magnitude", "mixup_alpha", "cutmix_alpha"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise bad(name, value, "must be a finite number >= 0")
        if not isinstance(self.randaug_ops, int) or isinstance(self.randaug_ops, bool) or self.randaug_ops < 0:
            raise bad("randaug_ops", self.randaug_ops, "must be an int >= 0")
        if not 0.0 <= self.cutmix_prob <= 1.0:
            raise bad("cutmix_prob", self.cutmix_prob, "must be in [0, 1]")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise bad("label_smoothing", self.label_smoothing, "must be in [0, 1)")

    @property
    def randaugment_on(self) -> bool:
        return self.randaug_ops > 0 and self.randaug_magnitude > 0

    @property
    def mixing_on(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    @property
    def soft_targets(self) -> bool:
        """Whether targets are [N, num_classes] float rows rather than int64 labels."""
        return self.mixing_on or self.label_smoothing > 0
