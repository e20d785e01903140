"""Training losses of the original models, as small ``nn.Module``s chosen in YAML with ``class_path``.

Every loss is called as ``loss(pred, target, mask, dataset_size[, batch_size])`` with ``pred`` and ``target``
``(B, N, T)``, ``mask`` ``(B, T)`` (True on frames that count) and ``dataset_size`` the mouse's number of trials
(the official baselines scale the loss by ``sqrt(dataset_size / batch_size)``); ``batch_size`` is the size of the
whole batch when ``pred`` is one mouse's share of a mixed batch. The reduction interacts with the learning rate,
so each model's recipe keeps its original reduction (models.md §8.4).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn


class PoissonLoss(nn.Module):
    """Poisson negative log-likelihood without the constant: ``pred - target * log(pred + eps)``.

    Args:
        reduction: ``sum`` over batch, neurons and frames (official baselines, Dynamic-V1FM), or ``sample_mean``:
            the mean over samples of per-sample sums (DwiseNeuro).
        scale_by_dataset: multiply by ``sqrt(dataset_size / batch_size)`` as the official trainer does
            (https://github.com/ecker-lab/sensorium_2023/blob/main/sensorium/training/video_training_loop.py).
        eps: added inside the log.
        clamp_target_min: clamp the targets from below first (0: DwiseNeuro's ReLU of the raw responses,
            ``src/responses.py``); None: targets as given.
    """

    def __init__(
        self,
        reduction: Literal["sum", "sample_mean"] = "sum",
        scale_by_dataset: bool = True,
        eps: float = 1e-8,
        clamp_target_min: float | None = None,
    ) -> None:
        super().__init__()
        self.reduction = reduction
        self.scale_by_dataset = scale_by_dataset
        self.eps = eps
        self.clamp_target_min = clamp_target_min

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        mask: Tensor | None = None,
        dataset_size: int = 1,
        batch_size: int | None = None,
    ) -> Tensor:
        """``batch_size``: samples of the whole batch when ``pred`` is one mouse's part of a mixed batch (the
        ``sample_mean`` denominator and the dataset scale then use it); default ``pred.shape[0]``."""
        if self.clamp_target_min is not None:
            target = target.clamp(min=self.clamp_target_min)
        nll = pred - target * torch.log(pred + self.eps)  # (B, N, T)
        if mask is not None:
            nll = nll * mask[:, None, :].to(nll.dtype)
        batch = batch_size or pred.shape[0]
        loss = nll.sum() if self.reduction == "sum" else nll.sum() / batch
        if self.scale_by_dataset:
            loss = loss * math.sqrt(dataset_size / batch)
        return loss
