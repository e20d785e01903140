"""Learning-rate schedules that torch lacks as one YAML-friendly class."""

from __future__ import annotations

import math

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler


class WarmupCosine(LambdaLR):
    """Linear warm-up from ``warmup_start_ratio``·lr to lr, then cosine decay to ``min_lr_ratio``·lr, per step.

    DwiseNeuro and ViV1T warm up then decay with a cosine (docs/models.md: DwiseNeuro, ViV1T). Stepped every optimizer
    step (``interval: step`` in ``configure_optimizers``).

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


class WarmupCosineRestart(LRScheduler):
    """mmcv's ``CosineRestart`` schedule by epoch, under a linear warm-up by iteration: Dynamic-V1FM's schedule.

    Port of ``CosineRestartLrUpdaterHook`` (``utils/lr_updater.py``) and mmcv ``LrUpdaterHook``'s linear warm-up, as
    ``config/neuroencoding.py`` sets them (docs/models.md: Dynamic-V1FM):
    https://github.com/zhuyu-cs/Dynamic-VFM/blob/main/utils/lr_updater.py
    https://github.com/open-mmlab/mmcv/blob/v1.7.0/mmcv/runner/hooks/lr_updater.py

    * Regular rate, constant within epoch ``e``: period ``i`` (cumulative ``periods``) anneals by a cosine from the
      base rate to ``min_lr[i]``: ``min_lr[i] + ½ · restart_weights[i] · (base − min_lr[i]) · (1 + cos(π α))`` with
      ``α = (e − start_i) / periods[i]``. The original's ``periods=[80, 100]``, ``min_lr=[1e-3, 1e-6]`` with base
      1e-3 give a constant 1e-3 for epochs 0–79, then a cosine to 1e-6 over epochs 80–179 (1e-6 is never reached:
      epoch 179 has α = 0.99).
    * Warm-up, for iterations ``it < warmup_steps``: the regular rate × ``1 − (1 − it / warmup_steps)(1 −
      warmup_ratio)``, i.e. from ``warmup_ratio`` × rate (1/3) to the rate over 600 iterations.

    Stepped every optimizer step (``scheduler_interval: step``); the epoch is ``step // steps_per_epoch``, since a
    torch scheduler does not see the trainer's epoch. With ``accumulate_over_mice: false`` and ``per_mouse`` batches
    an epoch has ``n_mice × max_mouse ⌈train trials / batch size⌉`` steps (the original's LongCycler): 10 × ⌈359 / 32⌉
    = 120 for the 2023 data. ``min_lr`` is absolute, as mmcv's. Past the last period the rate stays at the last
    ``min_lr`` (mmcv raises there).

    Args:
        optimizer: the optimizer.
        steps_per_epoch: optimizer steps per training epoch; ``None`` (the default): the
            :class:`~lightning_sensorium.module.SensoriumModule` sets it from the training loader when it builds the
            scheduler, so the schedule follows any data, batch size or accumulation.
        periods: epochs of each cosine period.
        min_lr: absolute final rate of each period.
        restart_weights: scale of the base rate at each restart (default: all 1).
        warmup_steps: iterations of linear warm-up (0: none).
        warmup_ratio: first warm-up rate as a fraction of the regular rate.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        steps_per_epoch: int | None = None,
        periods: tuple[int, ...] = (80, 100),
        min_lr: tuple[float, ...] = (1e-3, 1e-6),
        restart_weights: tuple[float, ...] | None = None,
        warmup_steps: int = 600,
        warmup_ratio: float = 1.0 / 3.0,
    ) -> None:
        weights = tuple(restart_weights) if restart_weights is not None else (1.0,) * len(periods)
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be ≥ 1, got {steps_per_epoch}")
        if not periods or len(min_lr) != len(periods) or len(weights) != len(periods):
            raise ValueError(
                f"periods {list(periods)}, min_lr {list(min_lr)} and restart_weights {list(weights)} "
                "must be non-empty and of the same length"
            )
        if any(p < 1 for p in periods):
            raise ValueError(f"periods must be ≥ 1 epoch each, got {list(periods)}")
        self.steps_per_epoch, self.periods, self.min_lr, self.restart_weights = (
            steps_per_epoch,
            tuple(periods),
            tuple(min_lr),
            weights,
        )
        self.warmup_steps, self.warmup_ratio = warmup_steps, warmup_ratio
        self.cumulative = [sum(self.periods[: i + 1]) for i in range(len(self.periods))]
        super().__init__(optimizer)

    def rate(self, step: int, base_lr: float) -> float:
        """Learning rate of optimizer step ``step`` (0-based) for a group whose base rate is ``base_lr``."""
        if self.steps_per_epoch is None:
            if step > 0:
                raise RuntimeError(
                    "WarmupCosineRestart: steps_per_epoch was never set (pass it, or train it under "
                    "SensoriumModule, which sets it from the training loader)"
                )
            epoch = 0
        else:
            epoch = step // self.steps_per_epoch
        index = next((i for i, end in enumerate(self.cumulative) if epoch < end), None)
        if index is None:
            regular = self.min_lr[-1]
        else:
            start = self.cumulative[index - 1] if index > 0 else 0
            alpha = min((epoch - start) / self.periods[index], 1.0)
            end = self.min_lr[index]
            regular = end + 0.5 * self.restart_weights[index] * (base_lr - end) * (math.cos(math.pi * alpha) + 1)
        if step < self.warmup_steps:
            return regular * (1 - (1 - step / self.warmup_steps) * (1 - self.warmup_ratio))
        return regular

    def get_lr(self) -> list[float | Tensor]:
        return [self.rate(self.last_epoch, float(base_lr)) for base_lr in self.base_lrs]
