"""Learning-rate schedules that torch lacks as one YAML-friendly class."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosine(LambdaLR):
    """Linear warm-up from ``warmup_start_ratio``·lr to lr, then cosine decay to ``min_lr_ratio``·lr, per step.

    DwiseNeuro and ViV1T warm up then decay with a cosine (models.md §4, §6). Stepped every optimizer step
    (``interval: step`` in ``configure_optimizers``).

    Args:
        optimizer: the optimizer.
        warmup_steps: steps of linear warm-up.
        total_steps: steps until the end of the cosine.
        min_lr_ratio: final learning rate as a fraction of the base one.
        warmup_start_ratio: first learning rate as a fraction of the base one.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 1000,
        total_steps: int = 10000,
        min_lr_ratio: float = 0.01,
        warmup_start_ratio: float = 0.01,
    ) -> None:
        self.warmup_steps, self.total_steps = warmup_steps, max(total_steps, warmup_steps + 1)
        self.min_lr_ratio, self.warmup_start_ratio = min_lr_ratio, warmup_start_ratio
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_start_ratio + (1 - self.warmup_start_ratio) * step / max(self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / (self.total_steps - self.warmup_steps), 1.0)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
