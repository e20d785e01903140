"""Shifters: per-mouse networks that turn the pupil centre into a shift of every readout position."""

from __future__ import annotations

from torch import Tensor, nn


class MLPShifter(nn.Module):
    """Pupil centre ``(..., 2)`` → readout shift ``(..., 2)`` in [-1, 1]: Linear → Tanh → … → Tanh.

    neuralpredictors ``MLPShifter`` with 3 layers of 5 hidden units and PyTorch's default initialisation (the
    original's ``initialize()`` never matches a layer, models.md §1):
    https://github.com/sinzlab/neuralpredictors/blob/main/neuralpredictors/layers/shifters/mlp.py

    Args:
        hidden_channels: hidden units per layer.
        layers: number of Linear layers.
        input_channels: size of the input (2: x, y).
    """

    def __init__(self, hidden_channels: int = 5, layers: int = 3, input_channels: int = 2) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        cin = input_channels
        for _ in range(layers - 1):
            mods += [nn.Linear(cin, hidden_channels), nn.Tanh()]
            cin = hidden_channels
        mods += [nn.Linear(cin, 2), nn.Tanh()]
        self.mlp = nn.Sequential(*mods)

    def forward(self, pupil_center: Tensor) -> Tensor:
        return self.mlp(pupil_center)
