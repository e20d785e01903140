"""Dynamic-V1FM's "hierarchical" Gaussian readout: a full-Gaussian readout fused with coarser readouts that share
read positions among groups of neighbouring neuron *indices*.

Port of ``FullGaussian2d`` of https://github.com/zhuyu-cs/Dynamic-VFM/blob/main/models/readouts_mean.py (mean
fusion) and https://github.com/zhuyu-cs/Dynamic-VFM/blob/main/models/readouts_adaptive.py (adaptive fusion), with
the submitted configuration of ``config/neuroencoding.py``. Its levels, fusion and differences:
:class:`HierarchicalGaussianReadout`; the recipe: docs/models.md, "Dynamic-V1FM (2nd place): 3D Swin core +
hierarchical Gaussian readout".
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sensorium.data.batch import NeuronInfo
from lightning_sensorium.models.readouts.gaussian import GaussianReadout

#: The levels the original allocates: neuron-index subsampling factors.
ORIGINAL_LEVELS: tuple[int, ...] = (2, 4, 8, 16)


class AdaptiveFusion(nn.Module):
    """``(B, L, T, N)`` → ``(B, T, N)``: per-sample level weights from each level's mean over (T, N)."""

    def __init__(self, levels: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(levels, levels), nn.ReLU(), nn.Linear(levels, levels), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        weights = self.mlp(x.mean(dim=(2, 3)))  # (B, L)
        return (x * weights[:, :, None, None]).sum(1)  # (B, T, N)


def _refinement(hidden: int) -> nn.Sequential:
    """Point-wise scalar MLP over the neuron axis: Conv1d(1 → hidden, 1) → ELU → Conv1d(hidden → 1, 1, no bias)."""
    return nn.Sequential(nn.Conv1d(1, hidden, 1), nn.ELU(), nn.Conv1d(hidden, 1, 1, bias=False))


class HierarchicalGaussianReadout(GaussianReadout):
    """Full-Gaussian readout fused with neuron-index-subsampled levels.

    * Base level: the :class:`~lightning_sensorium.models.readouts.gaussian.GaussianReadout` (neuralpredictors'
      ``FullGaussian2d``) with the original's settings: position MLP Linear(2, 32) → ELU → Linear(32, 2) → Tanh,
      σ U(−0.2, 0.2), features 1/C, per-neuron bias; the grid is sampled per (batch · frame) row in training, then
      shifted (after the clamp).
    * Level ``k``: that shifted grid subsampled along the neuron index to ``N // k`` "virtual neurons" (nearest
      interpolation: virtual neuron ``j`` reads at neuron ``⌊j · N / (N // k)⌋``'s position), read out with the
      level's own features ``(C, N // k)`` (1/C), upsampled back to ``N`` by nearest (neuron ``i`` takes virtual
      neuron ``⌊i · (N // k) / N⌋``), then refined point-wise by Conv1d(1 → 16k, 1) → ELU → Conv1d(16k → 1, 1, no
      bias), i.e. hidden widths 32, 64, 128, 256 for k = 2, 4, 8, 16. Groups are neighbours in the *index*, not in
      space.
    * Fusion of the base and the chosen levels, then the bias: ``mean``: their plain average; ``adaptive``:
      :class:`AdaptiveFusion` — per sample, the mean of each level over (frames, neurons) → Linear(L, L) → ReLU →
      Linear(L, L) → Sigmoid gives L weights; output = Σ weight · level. No levels: the base alone (the original's
      mode ``'0'``).

    The original selects the levels with a mode string (``'2_4_8_16'``, ``'2_8'``, … ``'0'``) and the fusion with
    the model class; here ``levels`` and ``fusion`` are typed options. Like the original, every level's features and
    refinement MLP (2, 4, 8, 16), and with adaptive fusion a fusion MLP for each of 2 … 5 inputs, are allocated
    whatever the choice (``allocate_all_levels``), so parameter counts match it: 3,452,885 per mouse at N = 7,863
    with mean fusion, 136 more with adaptive fusion. Unused parts receive no gradient (only AdamW's decay), which
    ``allocate_all_levels=False`` avoids (e.g. for DDP without ``find_unused_parameters``). Other differences: any
    number of frames works (the original reshapes with a hard-coded 15), the shift is optional (without it the levels
    are undefined in the original), and the bias starts at ``neurons.mean_responses`` as in ``GaussianReadout``.

    Args:
        in_shape: ``(C, H, W)`` of the core's features.
        neurons: the mouse's neurons: coordinates place the readout positions, mean responses set the bias.
        levels: subsampling factors fused with the base level, each ≥ 2 (the original's modes: any subset of
            2, 4, 8, 16; empty: the base alone).
        fusion: ``mean`` (``readouts_mean.py``) or ``adaptive`` (``readouts_adaptive.py``).
        allocate_all_levels: also allocate the original's levels (2, 4, 8, 16) and, with adaptive fusion, fusion
            MLPs for every number of inputs up to all of them, used or not (the original's parameter count).
        refine_width: hidden width of level ``k``'s refinement MLP is ``refine_width · k``.
        init_sigma: σ entries start uniform in ``[−init_sigma, init_sigma]``.
        grid_hidden_features: hidden units of the position MLP.
        bias: learn a per-neuron bias.
        feature_reg_weight: weight of the L1 (sum) penalty on the base features (0 in the original's training).
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        neurons: NeuronInfo,
        levels: tuple[int, ...] = ORIGINAL_LEVELS,
        fusion: Literal["mean", "adaptive"] = "mean",
        allocate_all_levels: bool = True,
        refine_width: int = 16,
        init_sigma: float = 0.2,
        grid_hidden_features: int = 32,
        bias: bool = True,
        feature_reg_weight: float = 0.0,
    ) -> None:
        super().__init__(in_shape, neurons, init_sigma, grid_hidden_features, bias, feature_reg_weight)
        if fusion not in ("mean", "adaptive"):
            raise ValueError(f"fusion must be 'mean' or 'adaptive', got {fusion!r}")
        levels = tuple(int(k) for k in levels)
        if len(set(levels)) != len(levels) or any(k < 2 for k in levels):
            raise ValueError(f"levels must be distinct subsampling factors ≥ 2, got {list(levels)}")
        if any(self.num_neurons // k < 1 for k in levels):
            raise ValueError(f"levels {list(levels)} leave no neuron for {self.num_neurons} neurons: use factors ≤ N")
        self.levels, self.fusion = levels, fusion
        allocated = sorted(set(levels) | set(ORIGINAL_LEVELS if allocate_all_levels else ()))
        allocated = [k for k in allocated if self.num_neurons // k >= 1]
        c, n = self.in_shape[0], self.num_neurons
        # (1, C, 1, N // k) per level, as the base's (1, C, 1, N); keys are the factors.
        self.level_features = nn.ParameterDict(
            {str(k): nn.Parameter(torch.full((1, c, 1, n // k), 1.0 / c)) for k in allocated}
        )
        self.refinements = nn.ModuleDict({str(k): _refinement(refine_width * k) for k in allocated})
        # Adaptive fusion MLPs keyed by their number of inputs (base + levels): the original has 2, 3, 4 and 5.
        inputs: list[int] = []
        if fusion == "adaptive" and allocate_all_levels:
            inputs = list(range(2, len(allocated) + 2))
        elif fusion == "adaptive" and levels:
            inputs = [len(levels) + 1]
        self.fusions = nn.ModuleDict({str(i): AdaptiveFusion(i) for i in inputs})

    def _read(self, x: Tensor, grid: Tensor, features: Tensor) -> Tensor:
        """Features ``x (R, C, H, W)`` read at ``grid (R, M, 1, 2)`` and weighted by ``features (1, C, 1, M)`` →
        ``(R, M)``."""
        y = self.read_at(x, grid)  # (R, C, M, 1)
        return (y.squeeze(-1) * features.squeeze(2).to(y.dtype)).sum(1)  # (R, M)

    def forward(self, features: Tensor, shift: Tensor | None = None, behavior: Tensor | None = None) -> Tensor:
        b, c, t, h, w = features.shape
        n = self.num_neurons
        x = features.transpose(1, 2).reshape(b * t, c, h, w)  # (B·T, C, H, W)
        grid = self.sample_grid(b * t).to(x.dtype)  # (B·T, N, 1, 2)
        if shift is not None:
            grid = grid + shift.reshape(b * t, 1, 1, 2).to(x.dtype)  # after the clamp, as the original
        outputs = [self._read(x, grid, self.features)]  # [(B·T, N)]
        for k in self.levels:
            m = n // k
            # Every (N / m)-th neuron's position: nearest interpolation along the neuron axis, as the original.
            sub = F.interpolate(grid.permute(0, 2, 1, 3), size=(m, 2), mode="nearest")  # (B·T, 1, m, 2)
            sub = sub.permute(0, 2, 1, 3)  # (B·T, m, 1, 2)
            y = self._read(x, sub, self.level_features[str(k)])  # (B·T, m)
            y = F.interpolate(y[:, None, None, :], size=(1, n), mode="nearest")[:, 0]  # (B·T, 1, N): back to N
            outputs.append(self.refinements[str(k)](y)[:, 0])  # (B·T, N)
        if len(outputs) == 1:
            y = outputs[0]  # (B·T, N)
        elif self.fusion == "mean":
            y = torch.stack(outputs).mean(0)  # (B·T, N)
        else:
            stacked = torch.stack(outputs, dim=1).view(b, t, len(outputs), n).transpose(1, 2)  # (B, L, T, N)
            y = self.fusions[str(len(outputs))](stacked).reshape(b * t, n)  # (B·T, N)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(b, t, n).transpose(1, 2)  # (B, N, T)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, levels={list(self.levels)}, fusion={self.fusion!r}"


__all__ = ["ORIGINAL_LEVELS", "AdaptiveFusion", "HierarchicalGaussianReadout"]
