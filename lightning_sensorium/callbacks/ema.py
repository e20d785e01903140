"""Exponential moving average of the weights (EMA), as DwiseNeuro trains (decay 0.999, every step, BN buffers too).

A Lightning :class:`~lightning.pytorch.callbacks.WeightAveraging` that behaves like the original's timm
``ModelEmaV2`` (https://github.com/lRomul/sensorium/blob/master/src/ema.py) and, unlike Lightning's own
``EMAWeightAveraging``, works with this project's CLI, ``ddp_spawn``, ``bf16-true`` and resumed fits. Its four
changes and when to use the built-in instead: docs/training.md, "EMA".
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel


class EMAMultiAvg:
    """Picklable in-place EMA blend for :class:`AveragedModel` (``multi_avg_fn``): ``e ← decay·e + (1−decay)·w``.

    Integer tensors (BatchNorm's ``num_batches_tracked``) are copied from the raw model: a blended counter would be
    truncated to a meaningless integer (timm ModelEmaV2 blends and truncates; only BN with ``momentum=None`` reads it).
    """

    def __init__(self, decay: float) -> None:
        self.decay = decay

    @torch.no_grad()
    def __call__(self, averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        # AveragedModel calls this once per (device, dtype) group, so one dtype per call.
        if torch.is_floating_point(averaged[0]) or torch.is_complex(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1.0 - self.decay)
        else:
            for a, c in zip(averaged, current, strict=True):
                a.copy_(c)


def tensor_skeleton(module: nn.Module) -> nn.Module:
    """A bare module tree registering the same parameters and buffers (the same tensors, same names) as ``module``.

    :class:`AveragedModel` deep-copies its model. Deep-copying the LightningModule itself would also copy everything
    its attributes reach: under LightningCLI the optimizer factory refers to the CLI, hence to the Trainer, the data
    and, once the strategy has wrapped the model, the DDP wrapper, which cannot be copied. The skeleton holds only
    the tensors, so the copy is exactly one set of weights; parameter order, tied weights and ``state_dict`` names
    (so checkpoints) match the module's.
    """
    skeleton = nn.Module()
    for name, param in module._parameters.items():
        skeleton.register_parameter(name, param)
    for name, buf in module._buffers.items():
        skeleton.register_buffer(name, buf, persistent=name not in module._non_persistent_buffers_set)
    for name, child in module._modules.items():
        skeleton.add_module(name, None if child is None else tensor_skeleton(child))
    return skeleton


class EMA(WeightAveraging):
    """Keep an exponential moving average of all weights and buffers; validate and checkpoint with it.

    Validation (so the monitored metric, ModelCheckpoint and early stopping) runs on the averaged weights; a
    checkpoint's ``state_dict`` holds the averaged weights (what ``load_from_checkpoint`` and evaluation use) and
    ``current_model_state`` the raw ones; resuming with ``ckpt_path`` restores both. When training ends the module
    keeps the averaged weights.

    Args:
        decay: weight of the old average at each update (DwiseNeuro: 0.999). ``1 − decay`` is the weight of the
            current weights; the average's time constant is about ``update_every_n_steps / (1 − decay)`` steps.
        start_step: first optimizer step (zero-based) that updates the average. ``0``: the average starts at the
            initial weights and every update blends (timm ModelEmaV2, the original). ``k > 0``: the average is a
            plain copy of the weights after step ``k`` (skipping the noisy first steps), then blends.
        update_every_n_steps: update after every n-th optimizer step from ``start_step`` on.
        sync_buffers: under multi-process training, broadcast rank 0's averaged buffers (BatchNorm statistics, which
            each rank updates from its own micro-batches) to all ranks after each update.
        device: where to keep the average (default: the module's device); ``cpu`` saves accelerator memory at the cost
            of a copy per update.
    """

    def __init__(
        self,
        decay: float = 0.999,
        start_step: int = 0,
        update_every_n_steps: int = 1,
        sync_buffers: bool = True,
        device: str | None = None,
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA: decay must be in [0, 1], got {decay}")
        if start_step < 0:
            raise ValueError(f"EMA: start_step must be >= 0, got {start_step}")
        if update_every_n_steps < 1:
            raise ValueError(f"EMA: update_every_n_steps must be >= 1, got {update_every_n_steps}")
        super().__init__(device=device, use_buffers=True, multi_avg_fn=EMAMultiAvg(decay))
        self.decay = decay
        self.start_step = start_step
        self.update_every_n_steps = update_every_n_steps
        self.sync_buffers = sync_buffers
        # (averaged state_dict, averaging_state) read from a checkpoint before the copy exists (see on_load_checkpoint).
        self._pending: tuple[dict[str, Any], dict[str, Any]] | None = None

    @property
    def average_model(self) -> AveragedModel | None:
        """The :class:`AveragedModel` (``.module`` is the averaged LightningModule); None outside ``fit``."""
        return self._average_model

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        if step_idx is None or step_idx < self.start_step:
            return False
        return (step_idx - self.start_step) % self.update_every_n_steps == 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Deliberately empty: at setup the module is not yet on its device nor cast to its precision.
        pass

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After strategy.setup: the module is on its device, in its dtype, and DDP has broadcast rank 0's weights.
        self._average_model = AveragedModel(
            tensor_skeleton(pl_module),
            device=self._device or pl_module.device,
            use_buffers=self._use_buffers,
            **self._kwargs,
        )
        if self._pending is not None:
            averaged, averaging_state = self._pending
            self._average_model.load_state_dict({"module." + k: v for k, v in averaged.items()} | averaging_state)
            self._pending = None
        elif self.start_step == 0:
            # ModelEmaV2: the copy of the initial weights is already the average; the first update blends.
            self._average_model.n_averaged.fill_(1)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        before = self._latest_update_step
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._latest_update_step != before and self.sync_buffers and trainer.world_size > 1:
            self._broadcast_buffers()

    def _broadcast_buffers(self) -> None:
        """Make every rank's averaged buffers rank 0's (one flat broadcast per dtype)."""
        assert self._average_model is not None
        buffers = [b for b in self._average_model.module.buffers() if b.numel()]
        if not (buffers and torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        for dtype in sorted({b.dtype for b in buffers}, key=str):
            group = [b for b in buffers if b.dtype == dtype]
            flat = torch.cat([b.reshape(-1) for b in group])  # (sum of numels,)
            torch.distributed.broadcast(flat, src=0)
            for b, v in zip(group, torch.split(flat, [b.numel() for b in group]), strict=True):
                b.copy_(v.view_as(b))

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            # validate/test/predict with ckpt_path: the module keeps the averaged weights of `state_dict`.
            return
        if self._average_model is not None:
            # Strategies that restore after setup: the copy exists, Lightning's restore applies.
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
        elif "current_model_state" in checkpoint and "averaging_state" in checkpoint:
            # Default order: restored before on_fit_start. Keep the average for later, give the module the raw weights.
            self._pending = (checkpoint["state_dict"], checkpoint["averaging_state"])
            pl_module.load_state_dict(checkpoint["current_model_state"])
        # A checkpoint without EMA: the module holds its weights, and on_fit_start starts the average from them.
