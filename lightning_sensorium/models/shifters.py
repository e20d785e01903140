"""Shifters: per-mouse networks that turn the pupil centre into a shift of every readout position."""

from __future__ import annotations

from torch import Tensor, nn


class MLPShifter(nn.Module):
    """Pupil centre ``(..., 2)`` → readout shift ``(..., 2)`` in [−1, 1]: (Linear → Tanh) × ``layers``.

    Port of neuralpredictors' ``MLP`` shifter with the 2023 baselines' settings (3 layers, 5 hidden units:
    Linear(2, 5) → Tanh → Linear(5, 5) → Tanh → Linear(5, 2) → Tanh, 57 parameters). PyTorch's default Linear
    init applies, as in the original, whose ``initialize()`` never matches a layer (docs/models.md: GRU baseline):
    https://github.com/sinzlab/neuralpredictors/blob/main/neuralpredictors/layers/shifters/mlp.py

    Args:
        hidden_channels: hidden units per layer.
        layers: number of Linear layers (1: no hidden layer).
        input_channels: size of the input (2: pupil x, y).
        bias: Linear layers with a bias.
    """

    def __init__(self, hidden_channels: int = 5, layers: int = 3, input_channels: int = 2, bias: bool = True) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be ≥ 1, got {layers}")
        modules: list[nn.Module] = []
        in_features = input_channels
        for _ in range(layers - 1):
            modules += [nn.Linear(in_features, hidden_channels, bias=bias), nn.Tanh()]
            in_features = hidden_channels
        modules += [nn.Linear(in_features, 2, bias=bias), nn.Tanh()]
        self.mlp = nn.Sequential(*modules)

    def forward(self, pupil_center: Tensor) -> Tensor:
        """``(..., input_channels)`` → ``(..., 2)``; the Encoder passes ``(B, T, 2)`` for the last T frames."""
        return self.mlp(pupil_center)


__all__ = ["MLPShifter"]
