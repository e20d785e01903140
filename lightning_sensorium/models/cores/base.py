"""The Core contract: a video (+ behaviour) in, a feature video out, shared by all mice of an Encoder."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn


class Core(nn.Module, ABC):
    """Shared feature extractor of an :class:`~lightning_sensorium.models.encoder.Encoder`.

    ``forward(video (B, C, T, H, W), behavior (B, 2, T) | None, pupil_center (B, 2, T) | None)`` returns features
    ``(B, C', T', H', W')``. ``C`` is the video's channels (1, grey); a core that wants behaviour or the pupil
    centre as image channels adds them itself (:func:`~lightning_sensorium.models.layers.behavior_as_channels`).

    Time alignment: the output covers the *last* ``T'`` input frames, so output frame ``k`` belongs to input frame
    ``T − T' + k``; the first ``lost_frames = T − T'`` frames only serve as burn-in. Targets, pupil centres and
    anything else per frame are aligned by keeping their last ``T'`` frames (``x[..., -T':]``).
    """

    @abstractmethod
    def forward(self, video: Tensor, behavior: Tensor | None = None, pupil_center: Tensor | None = None) -> Tensor:
        """Features ``(B, C', T', H', W')`` aligned to the last ``T'`` input frames."""

    def regularizer(self) -> Tensor:
        """Penalty added to the training loss (default: none)."""
        param = next(self.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)

    def output_shape(self, input_shape: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """``(C', T', H', W')`` of the features for a video of shape ``(C, T, H, W)`` (default: a dry run in eval)."""
        c, t, h, w = input_shape
        param = next(self.parameters(), None)
        device = param.device if param is not None else None
        was_training = self.training
        self.eval()
        with torch.no_grad():
            video = torch.zeros(1, c, t, h, w, device=device)
            signals = torch.zeros(1, 2, t, device=device)
            out = self(video, signals, signals.clone())  # (1, C', T', H', W')
        self.train(was_training)
        c_out, t_out, h_out, w_out = out.shape[1:]
        return int(c_out), int(t_out), int(h_out), int(w_out)

    def lost_frames(self, input_shape: tuple[int, int, int, int]) -> int:
        """Leading input frames without an output frame (``T − T'``) for a video of shape ``(C, T, H, W)``."""
        return input_shape[1] - self.output_shape(input_shape)[1]


__all__ = ["Core"]
