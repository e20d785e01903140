"""Plateau schedule with restore-best, as the official baselines train.

neuralpredictors' ``early_stopping`` (https://github.com/sinzlab/neuralpredictors/blob/main/neuralpredictors/training/
early_stopping.py) with ``ReduceLROnPlateau``: when the monitored validation metric has not improved for ``patience``
epochs, restore the best weights and multiply every learning rate by ``factor``; after ``max_decays`` such decays
(or when the LR would fall below ``min_lr``), restore the best weights once more and stop.

neuralpredictors counts decays over the whole run; ViV1T's ``Scheduler`` (https://github.com/bryanlimy/ViV1T/blob/
main/src/viv1t/scheduler.py, ``step``) sets the count back to 0 whenever the metric improves, so ``max_decays``
bounds the decays *in a row without improvement*: ``reset_decays_on_improvement: true``.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class PlateauRestore(Callback):
    """Decay the learning rate on a plateau of ``monitor``, restoring the best weights each time.

    Args:
        monitor: logged metric to watch.
        mode: ``max`` (correlation) or ``min``.
        patience: validation epochs without improvement before a decay.
        factor: learning-rate multiplier at each decay.
        min_lr: stop instead of decaying below this learning rate.
        max_decays: stop after this many decays.
        threshold: minimal absolute improvement that counts.
        reset_decays_on_improvement: an improvement sets the decay count back to 0 (ViV1T), instead of counting
            every decay of the run (the baselines).
    """

    def __init__(
        self,
        monitor: str = "val/single_trial_corr",
        mode: Literal["max", "min"] = "max",
        patience: int = 5,
        factor: float = 0.3,
        min_lr: float = 1e-4,
        max_decays: int = 4,
        threshold: float = 1e-6,
        reset_decays_on_improvement: bool = False,
    ) -> None:
        self.monitor, self.mode = monitor, mode
        self.patience, self.factor, self.min_lr = patience, factor, min_lr
        self.max_decays, self.threshold = max_decays, threshold
        self.reset_decays_on_improvement = reset_decays_on_improvement
        self.best = -math.inf if mode == "max" else math.inf
        self.wait = 0
        self.decays = 0
        self._best_state: dict[str, torch.Tensor] | None = None

    def _improved(self, value: float) -> bool:
        if self.mode == "max":
            return value > self.best + self.threshold
        return value < self.best - self.threshold

    def _restore(self, pl_module: L.LightningModule) -> None:
        if self._best_state is not None:
            pl_module.load_state_dict(self._best_state)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        if self._improved(value):
            self.best, self.wait = value, 0
            if self.reset_decays_on_improvement:
                self.decays = 0
            self._best_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            return
        self.wait += 1
        if self.wait < self.patience:
            return
        self.wait = 0
        self._restore(pl_module)
        lrs = [g["lr"] * self.factor for opt in trainer.optimizers for g in opt.param_groups]
        if self.decays >= self.max_decays or min(lrs) < self.min_lr:
            log.info("PlateauRestore: best %s=%.4f restored; stopping", self.monitor, self.best)
            trainer.should_stop = True
            return
        self.decays += 1
        for opt in trainer.optimizers:
            for g in opt.param_groups:
                g["lr"] *= self.factor
        log.info("PlateauRestore: decay %d, best %s=%.4f restored", self.decays, self.monitor, self.best)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "wait": self.wait,
            "decays": self.decays,
            "best_state": copy.copy(self._best_state),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best, self.wait, self.decays = state_dict["best"], state_dict["wait"], state_dict["decays"]
        self._best_state = state_dict.get("best_state")
