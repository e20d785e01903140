"""Blocks and functions shared by several architectures (one place for each piece of logic)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ELU1(nn.Module):
    """``ELU(x) + 1``: the baselines' positive output nonlinearity."""

    def forward(self, x: Tensor) -> Tensor:
        return F.elu(x) + 1.0


def behavior_as_channels(video: Tensor, behavior: Tensor | None, pupil_center: Tensor | None = None) -> Tensor:
    """Append behaviour (and pupil-centre) signals as constant image channels, as the official loaders do.

    ``video (B, C, T, H, W)``, ``behavior (B, 2, T)``, ``pupil_center (B, 2, T)`` → ``(B, C + 2 [+ 2], T, H, W)``.
    """
    b, _, t, h, w = video.shape
    extra = [x for x in (behavior, pupil_center) if x is not None]
    if not extra:
        return video
    maps = torch.cat(extra, dim=1)[..., None, None].expand(b, -1, t, h, w)  # (B, 2|4, T, H, W)
    return torch.cat([video, maps.to(video.dtype)], dim=1)


_LAPLACE_2D = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]])
_LAPLACE_1D = torch.tensor([-1.0, 4.0, -1.0])


def laplace_l2(weight: Tensor) -> Tensor:
    """Smoothness of 2D filters ``(O, I, k, k)``: Σ(Laplace * w)² / Σ w² (neuralpredictors ``LaplaceL2norm``).

    https://github.com/sinzlab/neuralpredictors/blob/main/neuralpredictors/regularizers.py
    """
    o, i, k1, k2 = weight.shape
    w = weight.reshape(o * i, 1, k1, k2)  # (O·I, 1, k, k)
    lap = F.conv2d(w, _LAPLACE_2D.to(w)[None, None], padding=1)
    return lap.pow(2).sum() / w.pow(2).sum()


def depth_laplace_l2_1d(weight: Tensor) -> Tensor:
    """Smoothness of 1D temporal filters ``(O, I, t)`` with the [-1, 4, -1] filter (``DepthLaplaceL21d``).

    The filter sums to 2 (not a true second difference); kept as the original has it (models.md §2).
    """
    o, i, t = weight.shape
    w = weight.reshape(o * i, 1, t)  # (O·I, 1, t)
    lap = F.conv1d(w, _LAPLACE_1D.to(w)[None, None], padding=1)
    return lap.pow(2).sum() / w.pow(2).sum()
