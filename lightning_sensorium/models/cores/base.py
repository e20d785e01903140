"""The Core contract: video (+ behaviour) in, a feature video out."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn


class Core(nn.Module, ABC):
    """Shared feature extractor of an Encoder.

    ``forward(video (B, C, T, H, W), behavior (B, 2, T) | None, pupil_center (B, 2, T) | None)`` returns features
    ``(B, C', T', H', W')`` aligned to the *last* ``T'`` input frames (output frame k ↔ input frame T − T' + k).
    """

    @abstractmethod
    def forward(self, video: Tensor, behavior: Tensor | None = None, pupil_center: Tensor | None = None) -> Tensor:
        """Features ``(B, C', T', H', W')``."""

    def regularizer(self) -> Tensor:
        """Penalty added to the loss (default none)."""
        return torch.zeros((), device=next(self.parameters()).device)

    def output_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(C', T', H', W')`` for an input of ``frames × height × width`` (default: a dry run)."""
        param = next(self.parameters())
        was_training = self.training
        self.eval()
        with torch.no_grad():
            video = torch.zeros(1, 1, frames, height, width, device=param.device)
            behavior = torch.zeros(1, 2, frames, device=param.device)
            out = self(video, behavior, behavior.clone())
        self.train(was_training)
        c, t, h, w = out.shape[1:]
        return int(c), int(t), int(h), int(w)
