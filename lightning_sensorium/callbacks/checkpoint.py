"""Checkpoints a crash cannot take away: ``last.ckpt`` is always the latest state, written atomically, never
non-finite; and a non-finite training loss stops the fit at once with what to try.

Lightning 2.6's ``ModelCheckpoint(save_last=True)`` rewrites ``last.ckpt`` only when a top-k checkpoint is saved in
the same step, so a run whose validation stopped improving keeps an old ``last.ckpt``, and a run without validation
(a time budget) has none until it ends. It also writes through a temporary file in ``$TMPDIR``, which is not atomic
across file systems. Docs: docs/training.md, "Checkpoints and non-finite values".
"""

from __future__ import annotations

import math
import random
import time
from typing import Any, cast

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

from lightning_sensorium.atomic import place, remove, temporary_sibling


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss or non-finite weights."""


def _non_finite(module: torch.nn.Module) -> str | None:
    """The name of the first parameter or floating buffer holding a NaN or Inf, else None."""
    for name, tensor in (*module.named_parameters(), *module.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def rng_states() -> dict[str, Any]:
    """The global random states a training step draws from (the Gaussian readout samples positions from torch's), in
    types a checkpoint holds: torch (CPU and CUDA), numpy, Python."""
    kind, keys, pos, has_gauss, gauss = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore :func:`rng_states`."""
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's :class:`~lightning.pytorch.callbacks.ModelCheckpoint` (the same options), made crash-safe:
    ``last.ckpt`` (``save_last: true``) is the latest state: also written at every epoch's end, every
    ``latest_every_n_steps`` optimizer steps and every ``latest_every_minutes`` minutes of training, whatever the
    monitored metric did. Every checkpoint it writes goes to a temporary sibling in the checkpoint folder, is
    flushed and renamed into place (a kill mid-save leaves the previous file whole), and is refused when a weight is
    not finite.

    Args:
        latest_every_n_steps: also refresh ``last.ckpt`` every this many optimizer steps (None: off).
        latest_every_minutes: also refresh it every this many minutes of training (None: off); the default loses at
            most 10 minutes of work to a crash.
        *args, **kwargs: :class:`~lightning.pytorch.callbacks.ModelCheckpoint`'s.
    """

    def __init__(
        self,
        *args: Any,
        latest_every_n_steps: int | None = None,
        latest_every_minutes: float | None = 10.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if latest_every_n_steps is not None and latest_every_n_steps < 1:
            raise ValueError(f"ModelCheckpoint latest_every_n_steps={latest_every_n_steps}: expected ≥ 1 or null")
        if latest_every_minutes is not None and not latest_every_minutes > 0:
            raise ValueError(f"ModelCheckpoint latest_every_minutes={latest_every_minutes}: expected > 0 or null")
        self.latest_every_n_steps = latest_every_n_steps
        self.latest_every_minutes = latest_every_minutes
        self._latest_time = time.monotonic()
        self._latest_step = -1
        self._rng_to_restore: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """Lightning's state plus the global random states at the save, so that a resumed run draws what the
        interrupted one would have (restored before its first batch, once its data loader is made)."""
        return {**super().state_dict(), "rng_states": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        self._rng_to_restore = state.pop("rng_states", None)
        super().load_state_dict(state)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def _refresh_last(self, trainer: L.Trainer) -> None:
        """Write ``last.ckpt`` for the current step unless it already holds it. Lightning's bookkeeping of what was
        saved at which step is left as it was, so that its own top-k save of the same step still happens."""
        if not self.save_last or self._should_skip_saving_checkpoint(trainer):
            return
        if self._latest_step == trainer.global_step:
            return
        kept = (self._last_global_step_saved, self._last_checkpoint_saved)
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._last_global_step_saved, self._last_checkpoint_saved = kept

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._latest_time = time.monotonic()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        steps, minutes = self.latest_every_n_steps, self.latest_every_minutes
        due_steps = steps is not None and trainer.global_step > 0 and trainer.global_step % steps == 0
        due_time = minutes is not None and time.monotonic() - self._latest_time >= 60 * minutes
        if due_steps or due_time:
            self._refresh_last(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._refresh_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._refresh_last(trainer)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        bad = _non_finite(trainer.lightning_module)
        if bad is not None:
            raise NonFiniteError(
                f"step {trainer.global_step}: {bad} is not finite; {filepath} was not written (the previous "
                "checkpoints are kept). Try a lower learning rate, gradient clipping (trainer.gradient_clip_val) "
                "or trainer.precision 32-true."
            )
        made = str(temporary_sibling(filepath, directory=False)) if trainer.is_global_zero else ""
        tmp: str = trainer.strategy.broadcast(made)  # rank 0 writes; every rank calls save_checkpoint
        try:
            trainer.save_checkpoint(tmp, self.save_weights_only)
            if trainer.is_global_zero:
                place(tmp, filepath)
        except BaseException:
            if trainer.is_global_zero:
                remove(tmp)
            raise
        trainer.strategy.barrier("sensorium_checkpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if filepath == getattr(self, "last_model_path", None):
            self._latest_step, self._latest_time = trainer.global_step, time.monotonic()
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)


class FiniteLoss(L.Callback):
    """Stops the fit at the first non-finite training loss, naming the step, the last checkpoint and what to try
    (instead of training on NaN weights and failing later with a misleading message)."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor) or bool(torch.isfinite(loss.detach()).all()):
            return
        value = float(loss.detach().float().reshape(-1)[0])
        ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "")
        where = f"the last checkpoint is {ckpt}" if ckpt else "no checkpoint was written yet"
        raise NonFiniteError(
            f"step {trainer.global_step}: the training loss is {'NaN' if math.isnan(value) else value}; {where}. "
            "Try a lower learning rate (model.optimizer.init_args.lr), gradient clipping "
            "(trainer.gradient_clip_val) or trainer.precision 32-true."
        )
