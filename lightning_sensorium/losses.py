"""Training losses of the original models, as small ``nn.Module``s chosen in YAML with ``class_path``.

Every loss is called as ``loss(pred, target, mask, dataset_size)`` with ``pred`` and ``target`` ``(B, N, T)``,
``mask`` ``(B, T)`` (True on frames that count) and ``dataset_size`` the mouse's number of trials (the official
baselines scale the loss by ``sqrt(dataset_size / batch_size)``). The reduction interacts with the learning rate,
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
    """

    def __init__(
        self,
        reduction: Literal["sum", "sample_mean"] = "sum",
        scale_by_dataset: bool = True,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        self.reduction = reduction
        self.scale_by_dataset = scale_by_dataset
        self.eps = eps

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None = None, dataset_size: int = 1) -> Tensor:
        nll = pred - target * torch.log(pred + self.eps)  # (B, N, T)
        if mask is not None:
            nll = nll * mask[:, None, :].to(nll.dtype)
        batch = pred.shape[0]
        loss = nll.sum() if self.reduction == "sum" else nll.sum() / batch
        if self.scale_by_dataset:
            loss = loss * math.sqrt(dataset_size / batch)
        return loss
