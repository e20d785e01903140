"""Gaussian readout with a full covariance and positions predicted from cortical coordinates.

Port of neuralpredictors' ``FullGaussian2d`` with a ``cortex`` grid-mean predictor
(https://github.com/sinzlab/neuralpredictors/blob/main/neuralpredictors/layers/readouts/gaussian.py) as the
SENSORIUM 2023 baselines configure it (``gauss_type='full'``, ``batch_sample=True``, ``align_corners=True``;
https://github.com/ecker-lab/sensorium_2023/blob/main/notebooks/benchmarks_training.ipynb). The base of the
Dynamic-V1FM and ViV1T readouts. Its model and differences: :class:`GaussianReadout`; its recipes: docs/models.md,
"Factorized baseline (`experiments/factorized.yaml`)" and "GRU baseline (`experiments/gru.yaml`)".
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sensorium.data.batch import NeuronInfo
from lightning_sensorium.models.readouts.base import Readout


def _normalised_grid(coordinates: np.ndarray) -> np.ndarray:
    """Cortical ``(N, 3)`` coordinates → ``(N, 2)`` x, y centred and divided by the largest |value| (float32)."""
    xy = np.asarray(coordinates, dtype=np.float64)[:, :2]  # (N, 2)
    if xy.shape[0] == 0:
        return xy.astype(np.float32)
    xy = xy - xy.mean(axis=0, keepdims=True)
    scale = np.abs(xy).max()
    return (xy / scale if scale > 0 else xy).astype(np.float32)


class GaussianReadout(Readout):
    """Per-mouse full-Gaussian readout with a coordinate-driven position predictor.

    * μ = MLP(normalised cortical x, y): Linear(2, 30) → ELU → Linear(30, 2) → Tanh. Positions are a smooth, learned
      function of where a neuron sits in cortex (retinotopy), not free parameters. The coordinates are centred per
      mouse and divided by their largest absolute value, and kept as a buffer, so a checkpoint needs no data.
    * σ: a full 2×2 matrix per neuron, initialised U(−init_sigma, init_sigma). Training samples
      ``grid = clamp(σ z + μ, −1, 1)`` with a fresh ``z ~ N(0, I)`` for every (batch · frame) row and neuron;
      evaluation reads at ``clamp(μ, −1, 1)``.
    * The gaze shift is added *after* the clamp, so a position may leave the frame; ``grid_sample`` (bilinear, zero
      padding, ``align_corners=True``) then reads zeros there. The grid is made contiguous first: the einsum's
      strided result (and the expanded μ of evaluation) send CPU ``grid_sample`` down a path ~4× slower
      (``benchmarks/bench_readout.py``), a cost the original pays.
    * Response ``y_n = Σ_c F[c, grid_n] · w[c, n] + b_n`` with ``w`` initialised to 1/C.

    Differences from the original: the bias starts at ``neurons.mean_responses`` (the mean over the training frames)
    instead of the mean of the first training batch, so it is deterministic and needs no loader; if all neurons
    share one position, the coordinates are left unscaled instead of divided by zero; the options the baselines do
    not use (free or shared grids, shared features, other Gaussian types, ``out_idx``) are left out.

    Args:
        in_shape: ``(C, H, W)`` of the core's features.
        neurons: the mouse's neurons: coordinates place the readout positions, mean responses set the bias.
        init_sigma: σ entries start uniform in ``[−init_sigma, init_sigma]``.
        grid_hidden_features: hidden units of the position MLP.
        bias: learn a per-neuron bias.
        feature_reg_weight: weight of the L1 (sum) penalty on the feature weights (0 in every 2023 model).
        feature_init_std: the feature weights start at ``1/C`` plus Gaussian noise of this std. 0 (the original's
            constant init) gives every core channel the same gradient from every neuron at the first step, a
            symmetry the core leaves only slowly (a plateau in the demo's learning curves; ``1/C`` removes it).
    """

    source_grid: Tensor  # (N, 2) normalised cortical x, y (buffer)

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        neurons: NeuronInfo,
        init_sigma: float = 1.0,
        grid_hidden_features: int = 30,
        bias: bool = True,
        feature_reg_weight: float = 0.0,
        feature_init_std: float = 0.0,
    ) -> None:
        super().__init__(in_shape, neurons)
        if feature_init_std < 0:
            raise ValueError(f"feature_init_std must be ≥ 0, got {feature_init_std}")
        if init_sigma <= 0:
            raise ValueError(f"init_sigma must be positive, got {init_sigma}")
        c, n = self.in_shape[0], self.num_neurons
        self.feature_reg_weight = feature_reg_weight
        self.register_buffer("source_grid", torch.from_numpy(_normalised_grid(neurons.coordinates)))  # (N, 2)
        self.grid_predictor = nn.Sequential(
            nn.Linear(2, grid_hidden_features), nn.ELU(), nn.Linear(grid_hidden_features, 2), nn.Tanh()
        )
        self.sigma = nn.Parameter(torch.empty(1, n, 2, 2).uniform_(-init_sigma, init_sigma))  # (1, N, 2, 2)
        self.features = nn.Parameter(torch.full((1, c, 1, n), 1.0 / c))  # (1, C, 1, N)
        if feature_init_std > 0:
            with torch.no_grad():
                self.features.add_(torch.randn_like(self.features), alpha=feature_init_std)
        if bias:
            mean = torch.as_tensor(np.asarray(neurons.mean_responses), dtype=torch.float32).reshape(n)
            self.bias: nn.Parameter | None = nn.Parameter(mean.clone())  # (N,)
        else:
            self.register_parameter("bias", None)

    def positions(self) -> Tensor:
        """Mean read positions μ ``(N, 2)``, (x, y) in the normalised frame [−1, 1]² (before the clamp)."""
        return self.grid_predictor(self.source_grid)

    def sample_grid(self, rows: int, sample: bool | None = None) -> Tensor:
        """Read positions ``(rows, N, 1, 2)``: sampled around μ if ``sample`` (default: in training), else μ."""
        mu = self.positions()[None, :, None, :]  # (1, N, 1, 2)
        if not (self.training if sample is None else sample):
            return mu.clamp(-1, 1).expand(rows, -1, -1, -1)  # (rows, N, 1, 2)
        z = torch.randn(rows, self.num_neurons, 1, 2, device=mu.device, dtype=mu.dtype)  # (rows, N, 1, 2)
        # grid[b, n, 0, :] = σ_n z[b, n, 0, :] + μ_n
        return (torch.einsum("ancd,bnid->bnic", self.sigma, z) + mu).clamp(-1, 1)  # (rows, N, 1, 2)

    def forward(self, features: Tensor, shift: Tensor | None = None, behavior: Tensor | None = None) -> Tensor:
        return self.weigh(self.sample_features(features, shift), batch=features.shape[0])  # (B, N, T)

    def sample_features(self, features: Tensor, shift: Tensor | None = None) -> Tensor:
        """Features ``(B, C, T, H, W)`` read at every neuron's position: ``(B·T, C, N)``, rows in (b, t) order."""
        b, c, t, h, w = features.shape
        x = features.transpose(1, 2).reshape(b * t, c, h, w)  # (B·T, C, H, W)
        grid = self.sample_grid(b * t).to(x.dtype)  # (B·T, N, 1, 2)
        if shift is not None:
            grid = grid + shift.reshape(b * t, 1, 1, 2).to(x.dtype)  # after the clamp, as the original
        return self.read_at(x, grid).squeeze(-1)  # (B·T, C, N)

    @staticmethod
    def read_at(x: Tensor, grid: Tensor) -> Tensor:
        """Features ``x (R, C, H, W)`` at ``grid (R, M, 1, 2)`` → ``(R, C, M, 1)``: bilinear, zeros outside, corners
        aligned (the original's). The grid is made contiguous: strided, CPU ``grid_sample`` is ~4× slower."""
        return F.grid_sample(x, grid.contiguous(), mode="bilinear", padding_mode="zeros", align_corners=True)

    def weigh(self, sampled: Tensor, batch: int) -> Tensor:
        """Sampled features ``(B·T, C, N)`` → responses ``(B, N, T)``: per-neuron feature dot product + bias."""
        bt, c, n = sampled.shape
        y = (sampled * self.features.view(1, c, n).to(sampled.dtype)).sum(1)  # (B·T, N)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(batch, bt // batch, n).transpose(1, 2)  # (B, N, T)

    def regularizer(self) -> Tensor:
        """``feature_reg_weight · Σ |w|`` (the original's ``feature_l1`` with ``reduction='sum'``)."""
        return self.feature_reg_weight * self.features.abs().sum()

    def extra_repr(self) -> str:
        c, h, w = self.in_shape
        return f"mouse_id={self.mouse_id!r}, in_shape=({c}, {h}, {w}), neurons={self.num_neurons}"


__all__ = ["GaussianReadout"]
