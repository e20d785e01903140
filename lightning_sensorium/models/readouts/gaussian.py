"""Gaussian readout with a full covariance and positions predicted from cortical coordinates.

Port of neuralpredictors' ``FullGaussian2d`` with a grid-mean predictor as the SENSORIUM 2023 baselines use it
(models.md §1 "Readout"):
https://github.com/sinzlab/neuralpredictors/blob/main/neuralpredictors/layers/readouts/gaussian.py

* μ = MLP(normalised cortical x, y): Linear(2, 30) → ELU → Linear(30, 2) → Tanh, so positions are a smooth,
  learned function of where the neuron sits in cortex (retinotopy), not free parameters;
* σ: a full 2×2 matrix per neuron; training samples ``grid = clamp(σ z + μ, -1, 1)`` with fresh ``z`` for every
  (batch · frame) row and neuron, evaluation uses ``clamp(μ)``;
* the gaze shift is added *after* the clamp (positions may leave the frame and then read zeros);
* response = Σ_c F[c, grid] · w[c, n] + b_n, with ``w`` initialised to 1/C and ``b`` to the mean response.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sensorium.data.batch import NeuronInfo
from lightning_sensorium.models.readouts.base import Readout


class GaussianReadout(Readout):
    """Per-mouse Gaussian readout (see module docstring).

    Args:
        in_shape: ``(C, H, W)`` of the core's features.
        neurons: the mouse's neurons (coordinates place the readout positions, mean responses set the bias).
        init_sigma: σ entries start uniform in ``[-init_sigma, init_sigma]``.
        grid_hidden: hidden units of the position MLP.
        bias: learn a per-neuron bias.
        feature_reg_weight: L1 weight on the feature weights (0 in every 2023 model).
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        neurons: NeuronInfo,
        init_sigma: float = 1.0,
        grid_hidden: int = 30,
        bias: bool = True,
        feature_reg_weight: float = 0.0,
    ) -> None:
        super().__init__(in_shape, neurons)
        c = in_shape[0]
        n = neurons.num_neurons
        xy = torch.as_tensor(neurons.coordinates[:, :2], dtype=torch.float32).reshape(n, 2)
        xy = xy - xy.mean(0) if n else xy
        scale = xy.abs().max() if n and xy.abs().max() > 0 else torch.tensor(1.0)
        # Kept as a buffer: a checkpoint rebuilds the readout without the data.
        self.register_buffer("source_grid", xy / scale)  # (N, 2) in [-1, 1]
        self.grid_predictor = nn.Sequential(nn.Linear(2, grid_hidden), nn.ELU(), nn.Linear(grid_hidden, 2), nn.Tanh())
        self.sigma = nn.Parameter(torch.empty(1, n, 2, 2).uniform_(-init_sigma, init_sigma))
        self.features = nn.Parameter(torch.full((1, c, 1, n), 1.0 / c))
        mean = torch.as_tensor(neurons.mean_responses, dtype=torch.float32).reshape(n)
        self.bias = nn.Parameter(mean.clone()) if bias else None
        self.feature_reg_weight = feature_reg_weight

    def positions(self) -> Tensor:
        """Mean readout positions μ ``(N, 2)`` (x, y) in the normalised frame [-1, 1]²."""
        return self.grid_predictor(self.source_grid)

    def _grid(self, rows: int) -> Tensor:
        mu = self.positions()[None, :, None, :]  # (1, N, 1, 2)
        if not self.training:
            return mu.clamp(-1, 1).expand(rows, -1, -1, -1)
        z = torch.randn(rows, self.num_neurons, 1, 2, device=mu.device, dtype=mu.dtype)  # (rows, N, 1, 2)
        return (torch.einsum("ancd,bnid->bnic", self.sigma, z) + mu).clamp(-1, 1)

    def forward(self, features: Tensor, shift: Tensor | None = None) -> Tensor:
        b, c, t, h, w = features.shape
        x = features.transpose(1, 2).reshape(b * t, c, h, w)  # (B·T, C, H, W)
        grid = self._grid(b * t)  # (B·T, N, 1, 2)
        if shift is not None:
            grid = grid + shift.reshape(b * t, 1, 1, 2)  # after the clamp, as the original
        y = F.grid_sample(x, grid.to(x.dtype), align_corners=True)  # (B·T, C, N, 1)
        y = (y[..., 0] * self.features[..., 0].to(y.dtype)).sum(1)  # (B·T, N)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(b, t, -1).transpose(1, 2)  # (B, N, T)

    def regularizer(self) -> Tensor:
        return self.feature_reg_weight * self.features.abs().sum()
