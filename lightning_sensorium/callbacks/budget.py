"""Learning-rate decay over the end of a training budget given as time (``trainer.max_time``) or steps.

A run budgeted in minutes (the demo, a sweep trial) has no known step count, so no step-indexed schedule can end
with it, and a plateau schedule needs validation, which such runs skip. ``BudgetDecay`` keeps the learning rate
until the last ``fraction`` of the budget and then lowers it linearly to ``min_ratio`` × itself at the end (the
"warm-up-stable-decay" shape: https://arxiv.org/abs/2404.06395, §4). Progress is the elapsed share of
``max_time`` (Lightning's ``Timer``), else of ``max_steps``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, Timer


class BudgetDecay(Callback):
    """Linear decay of every learning rate over the last ``fraction`` of the budget.

    The factor multiplies the rates as they stand (it divides out the factor it applied last), so it composes with
    a callback that scales rates itself (``PlateauRestore``); a ``model.scheduler`` that sets rates absolutely does
    not compose and is refused.

    Args:
        fraction: share of the budget, at its end, over which the rate falls (0 < fraction ≤ 1).
        min_ratio: rate at the end of the budget as a fraction of the undecayed one.
    """

    def __init__(self, fraction: float = 0.3, min_ratio: float = 0.0) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"BudgetDecay: fraction must be in (0, 1], got {fraction}")
        if not 0 <= min_ratio <= 1:
            raise ValueError(f"BudgetDecay: min_ratio must be in [0, 1], got {min_ratio}")
        self.fraction, self.min_ratio = fraction, min_ratio
        self.applied = 1.0  # the factor the rates carry now

    def progress(self, trainer: L.Trainer) -> float:
        """Elapsed share of the budget in [0, 1]: of ``max_time`` if set, else of ``max_steps``."""
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)  # type: ignore[attr-defined]
        remaining = timer.time_remaining("train") if timer is not None else None
        if timer is not None and remaining is not None:
            elapsed = timer.time_elapsed("train")
            return min(elapsed / max(elapsed + remaining, 1e-9), 1.0)
        if trainer.max_steps > 0:
            return min(trainer.global_step / trainer.max_steps, 1.0)
        raise ValueError("BudgetDecay needs a budget: set trainer.max_time or trainer.max_steps")

    def factor(self, progress: float) -> float:
        """1 until ``1 − fraction`` of the budget, then linear to ``min_ratio`` at its end."""
        left = (1.0 - progress) / self.fraction
        return self.min_ratio + (1.0 - self.min_ratio) * min(max(left, 0.0), 1.0)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.lr_scheduler_configs:
            raise ValueError(
                "BudgetDecay sets the learning rate over the budget; remove model.scheduler "
                f"({type(trainer.lr_scheduler_configs[0].scheduler).__name__}) or the BudgetDecay callback"
            )
        self.progress(trainer)  # fail now, not at the first batch, if there is no budget

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        new = self.factor(self.progress(trainer))
        if new == self.applied:
            return
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                # The undecayed rate: divided out of the current one, or (after a factor of 0) the one kept.
                base = group["lr"] / self.applied if self.applied > 0 else group["budget_base_lr"]
                group["budget_base_lr"] = base
                group["lr"] = base * new
        self.applied = new

    def state_dict(self) -> dict[str, Any]:
        return {"applied": self.applied}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied = float(state_dict["applied"])
