"""Training losses of the original models, as small ``nn.Module``s chosen in YAML with ``class_path``.

Every loss is called as ``loss(pred, target, mask, dataset_size[, batch_size])`` with ``pred`` and ``target``
``(B, N, T)``, ``mask`` ``(B, T)`` (True on frames that count) and ``dataset_size`` the mouse's number of trials,
the data module's ``dataset_sizes`` (the losses that scale multiply by ``sqrt(dataset_size / batch_size)``);
``batch_size`` is the size of the whole batch when ``pred`` is one mouse's share of a mixed batch. Which trials the
originals count differs: the starter kit every trial of the recording (``len(dataset)`` of a dataset holding all
tiers, which its loaders sample by tier), ViV1T the trials it trains on (``len(train_ds[mouse].dataset)``). The
reduction interacts with the learning rate, so each model's recipe keeps its original reduction (docs/models.md:
Windows, mixed batches and distillation).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn


def poisson_nll(pred: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    """Elementwise Poisson negative log-likelihood of rates ``pred`` for ``target``, without the constant
    ``log(target!)``: ``pred - target * log(pred + eps)``."""
    return pred - target * torch.log(pred + eps)


class PoissonLoss(nn.Module):
    """Poisson negative log-likelihood without the constant: ``pred - target * log(pred + eps)``.

    Args:
        reduction: ``sum`` over batch, neurons and frames (official baselines, Dynamic-V1FM), or ``sample_mean``:
            the mean over samples of per-sample sums (DwiseNeuro).
        scale_by_dataset: multiply by ``sqrt(dataset_size / batch_size)`` as the official trainer does
            (``np.sqrt(len(dataloader[data_key].dataset) / args[0].shape[0])`` in
            https://github.com/ecker-lab/sensorium_2023/blob/main/sensorium/training/video_training_loop.py: every
            trial of the mouse's recording, the batch's windows).
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
        nll = poisson_nll(pred, target, self.eps)  # (B, N, T)
        if mask is not None:
            nll = nll * mask[:, None, :].to(nll.dtype)
        batch = batch_size or pred.shape[0]
        loss = nll.sum() if self.reduction == "sum" else nll.sum() / batch
        if self.scale_by_dataset:
            loss = loss * math.sqrt(dataset_size / batch)
        return loss


class PoissonCorrelationLoss(nn.Module):
    """ViV1T's default loss: Poisson NLL plus ``correlation_weight · Σ_n (1 − corr_n)`` (docs/models.md: ViV1T).

    Port of ``PoissonCorrelationLoss`` (``--criterion=poisson_correlation``) of
    https://github.com/bryanlimy/ViV1T/blob/main/src/viv1t/criterions.py:

    * Poisson: ``Σ (ŷ + ε) − (y + ε) · log(ŷ + ε)`` over batch, neurons and frames (ε added to both, as there);
    * correlation: per neuron over all (batch × frame) points of the batch, with the population std
      (``(y − mean) / (std + ε)``); the term is ``Σ_n (1 − corr_n)`` (the original writes ``2 − (corr + 1)``);
    * the sum of both × ``sqrt(dataset_size / batch_size)`` (``ds_scale=1``; ``Criterion.scale_ds``): per mouse,
      the trials the mouse trains on (``len(train_ds[mouse].dataset)``: its train tier, with ``ds_mode=3`` also
      the old mice's test tiers) over the mouse's batch size.

    ``mask`` ``(B, T)`` restricts both terms to the frames that count. Same call signature as
    :class:`PoissonLoss`.

    Args:
        correlation_weight: weight of the correlation term (the original's ``alpha``, 1000).
        scale_by_dataset: multiply by ``sqrt(dataset_size / batch_size)``.
        eps: the ε above (the original's float32 machine epsilon).
    """

    def __init__(
        self,
        correlation_weight: float = 1000.0,
        scale_by_dataset: bool = True,
        eps: float = float(torch.finfo(torch.float32).eps),
    ) -> None:
        super().__init__()
        self.correlation_weight = correlation_weight
        self.scale_by_dataset = scale_by_dataset
        self.eps = eps

    def correlation(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        """Per-neuron Pearson correlation ``(N,)`` over the (batch × frame) points of ``(B, N, T)`` (masked)."""
        w = torch.ones_like(pred[:, :1]) if mask is None else mask[:, None, :].to(pred.dtype)  # (B, 1, T)
        count = w.sum().clamp(min=1.0)

        def standardise(x: Tensor) -> Tensor:
            mean = (x * w).sum(dim=(0, 2), keepdim=True) / count  # (1, N, 1)
            std = (((x - mean) ** 2 * w).sum(dim=(0, 2), keepdim=True) / count).sqrt()  # (1, N, 1), population
            return (x - mean) / (std + self.eps)  # (B, N, T)

        return (standardise(target) * standardise(pred) * w).sum(dim=(0, 2)) / count  # (N,)

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        mask: Tensor | None = None,
        dataset_size: int = 1,
        batch_size: int | None = None,
    ) -> Tensor:
        """``batch_size``: samples of the whole batch when ``pred`` is one mouse's part of a mixed batch (the
        dataset scale then uses it); default ``pred.shape[0]``."""
        nll = (pred + self.eps) - (target + self.eps) * torch.log(pred + self.eps)  # (B, N, T)
        if mask is not None:
            nll = nll * mask[:, None, :].to(nll.dtype)
        loss = nll.sum() + self.correlation_weight * (1.0 - self.correlation(pred, target, mask)).sum()
        if self.scale_by_dataset:
            loss = loss * math.sqrt(dataset_size / (batch_size or pred.shape[0]))
        return loss
