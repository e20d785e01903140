"""The Readout contract: one per mouse, features of the shared core in, responses of that mouse's neurons out."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from lightning_sensorium.data.batch import NeuronInfo


class Readout(nn.Module, ABC):
    """Built as ``Readout(in_shape=(C, H, W), neurons=NeuronInfo, **options)``.

    ``forward(features (B, C, T, H, W), shift (B, T, 2) | None)`` returns ``(B, N, T)`` (before the output
    nonlinearity of the Encoder).
    """

    def __init__(self, in_shape: tuple[int, int, int], neurons: NeuronInfo) -> None:
        super().__init__()
        self.in_shape = tuple(in_shape)
        self.mouse_id = neurons.mouse_id
        self.num_neurons = neurons.num_neurons

    @abstractmethod
    def forward(self, features: Tensor, shift: Tensor | None = None) -> Tensor:
        """Responses ``(B, N, T)``."""

    def regularizer(self) -> Tensor:
        """Penalty added to the loss (default none)."""
        return torch.zeros((), device=next(self.parameters()).device)
