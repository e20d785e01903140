"""Plateau schedule with restore-best: the official baselines' and ViV1T's, timed as each original.

``timing: reduce_on_plateau`` is the starter kit's (https://github.com/ecker-lab/sensorium_2023/blob/main/sensorium/
training/video_training_loop.py): neuralpredictors' ``early_stopping`` (https://github.com/sinzlab/neuralpredictors/
blob/main/neuralpredictors/training/early_stopping.py) restores the best weights after ``patience`` epochs without
improvement, and a torch ``ReduceLROnPlateau`` with the same patience and threshold, stepped on the same metric
every epoch, decays the learning rate when its own count of bad epochs exceeds ``patience``: the 6th bad epoch,
one epoch after the restore, unless that epoch improves. ``timing: together`` restores and decays at once, on the
``patience``-th bad epoch, as ViV1T's ``Scheduler.step`` does (https://github.com/bryanlimy/ViV1T/blob/main/src/
viv1t/scheduler.py). The steps of each: docs/training.md, "PlateauRestore".
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

#: torch ``ReduceLROnPlateau``'s ``eps``: a decay smaller than this is ignored.
_REDUCE_LR_EPS = 1e-8


class PlateauRestore(Callback):
    """Decay the learning rate on a plateau of ``monitor``, restoring the best weights.

    Args:
        monitor: logged metric to watch.
        mode: ``max`` (correlation) or ``min``.
        patience: validation epochs without improvement before a restore (and, ``together``, a decay).
        factor: learning-rate multiplier at each decay.
        min_lr: the lowest learning rate; what a decay below it does is ``at_min_lr``.
        max_decays: plateaus training continues after; the next one restores the best weights and stops.
            ``reduce_on_plateau``: the starter kit's ``lr_decay_steps`` − 1 (its 4 → 3); ``together``: decays.
        threshold: minimal absolute improvement that counts (the starter kit's ``tolerance``, 1e-6; ViV1T 0).
        reset_decays_on_improvement: an improvement sets the plateau count back to 0 (ViV1T's ``num_reduce = 0``),
            instead of counting every plateau of the run (the baselines).
        timing: ``together``: restore and decay on the ``patience``-th bad epoch; ``reduce_on_plateau``: restore
            then, decay on the epoch the LR scheduler's own count of bad epochs (not reset by a restore, reset by
            a decay) exceeds ``patience``, and stop on a non-finite metric (the starter kit).
        initial_best: the value the first epoch must beat (ViV1T: 0, so a correlation ≤ 0 is never the best);
            None: the first validation sets the best.
        restore_on_collapse: restore the best weights, without counting the epoch, when the metric rounds to 0.00
            after the best reached 0.05 (ViV1T's ``has_collapsed``; ``mode: max`` only).
        at_min_lr: a decay that would take a learning rate below ``min_lr``: ``stop`` the fit (restoring the best
            weights), or ``clamp`` the rate at ``min_lr`` and go on (torch ``ReduceLROnPlateau``, ViV1T's
            ``max(factor · lr, min_lr)``).
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
        timing: Literal["together", "reduce_on_plateau"] = "together",
        initial_best: float | None = None,
        restore_on_collapse: bool = False,
        at_min_lr: Literal["stop", "clamp"] = "stop",
    ) -> None:
        if patience < 1 or max_decays < 0 or not 0.0 < factor < 1.0 or threshold < 0:
            raise ValueError(
                f"PlateauRestore: expected patience ≥ 1, max_decays ≥ 0, 0 < factor < 1 and threshold ≥ 0; got "
                f"patience={patience}, max_decays={max_decays}, factor={factor}, threshold={threshold}"
            )
        if restore_on_collapse and mode != "max":
            raise ValueError(
                "PlateauRestore: restore_on_collapse watches a correlation collapsing to 0: mode must be max"
            )
        self.monitor, self.mode = monitor, mode
        self.patience, self.factor, self.min_lr = patience, factor, min_lr
        self.max_decays, self.threshold = max_decays, threshold
        self.reset_decays_on_improvement = reset_decays_on_improvement
        self.timing = timing
        self.restore_on_collapse = restore_on_collapse
        self.at_min_lr = at_min_lr
        self.best = initial_best if initial_best is not None else (-math.inf if mode == "max" else math.inf)
        self.wait = 0  # bad epochs since the last improvement or restore (early_stopping's patience_counter)
        self.scheduler_wait = 0  # reduce_on_plateau: ReduceLROnPlateau's num_bad_epochs
        self.decays = 0  # together: decays; reduce_on_plateau: restores (plateaus)
        self.lr_decays = 0  # learning-rate decays of the run
        self._best_state: dict[str, torch.Tensor] | None = None

    def _improved(self, value: float) -> bool:
        if self.mode == "max":
            return value > self.best + self.threshold
        return value < self.best - self.threshold

    def _restore(self, pl_module: L.LightningModule) -> None:
        if self._best_state is not None:
            pl_module.load_state_dict(self._best_state)

    def _stop(self, trainer: L.Trainer, pl_module: L.LightningModule, why: str) -> None:
        self._restore(pl_module)
        log.info("PlateauRestore: %s; best %s=%.4f restored; stopping", why, self.monitor, self.best)
        trainer.should_stop = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        if self.timing == "reduce_on_plateau" and not math.isfinite(value):
            self._stop(trainer, pl_module, f"{self.monitor} is {value}")  # early_stopping: "Objective is not Finite"
            return
        if self._improved(value):
            self.best, self.wait, self.scheduler_wait = value, 0, 0
            if self.reset_decays_on_improvement:
                self.decays = 0
            self._best_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            return
        if self.restore_on_collapse and round(value, 2) <= 0.0 and self.best >= 0.05:
            self._restore(pl_module)  # ViV1T: "Model has collapsed. Restore checkpoint."; not a bad epoch
            return
        self.wait += 1
        if self.timing == "reduce_on_plateau":
            self._reduce_on_plateau(trainer, pl_module)
        else:
            self._together(trainer, pl_module)

    def _together(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """ViV1T's ``Scheduler.step``: on the ``patience``-th bad epoch, restore and decay, or stop."""
        if self.wait < self.patience:
            return
        self.wait = 0
        if self.decays >= self.max_decays or self._below_min_lr(trainer):
            self._stop(trainer, pl_module, f"plateau {self.decays + 1}")
            return
        self._restore(pl_module)
        self.decays += 1
        self._decay(trainer)
        log.info("PlateauRestore: decay %d, best %s=%.4f restored", self.decays, self.monitor, self.best)

    def _below_min_lr(self, trainer: L.Trainer) -> bool:
        """Whether the next decay would take a rate below ``min_lr`` and ``at_min_lr`` stops then."""
        lrs = [g["lr"] * self.factor for opt in trainer.optimizers for g in opt.param_groups]
        return self.at_min_lr == "stop" and min(lrs) < self.min_lr

    def _decay(self, trainer: L.Trainer) -> None:
        """Every rate × ``factor``, at least ``min_lr`` (a change under 1e-8 is skipped, as ``ReduceLROnPlateau``)."""
        for opt in trainer.optimizers:
            for g in opt.param_groups:
                new = max(g["lr"] * self.factor, self.min_lr)
                if g["lr"] - new > _REDUCE_LR_EPS:
                    g["lr"] = new
        self.lr_decays += 1

    def _reduce_on_plateau(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The starter kit's epoch after a bad one: ``ReduceLROnPlateau.step`` first, then ``early_stopping``."""
        self.scheduler_wait += 1
        if self.scheduler_wait > self.patience:  # ReduceLROnPlateau: num_bad_epochs > patience → _reduce_lr
            self.scheduler_wait = 0
            if self._below_min_lr(trainer):
                self._stop(trainer, pl_module, "the next decay is below min_lr")
                return
            self._decay(trainer)
            log.info("PlateauRestore: learning-rate decay %d", self.lr_decays)
        if self.wait < self.patience:
            return
        self.wait = 0  # early_stopping: patience_counter reached, a new `repeat` starts at 0
        if self.decays >= self.max_decays:
            self._stop(trainer, pl_module, f"plateau {self.decays + 1}")
            return
        self.decays += 1
        self._restore(pl_module)  # early_stopping's decay_lr: "Restoring best model after lr decay!"
        log.info("PlateauRestore: plateau %d, best %s=%.4f restored", self.decays, self.monitor, self.best)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "wait": self.wait,
            "scheduler_wait": self.scheduler_wait,
            "decays": self.decays,
            "lr_decays": self.lr_decays,
            "best_state": copy.copy(self._best_state),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best, self.wait, self.decays = state_dict["best"], state_dict["wait"], state_dict["decays"]
        self.scheduler_wait = state_dict.get("scheduler_wait", 0)
        self.lr_decays = state_dict.get("lr_decays", self.decays)
        self._best_state = state_dict.get("best_state")
