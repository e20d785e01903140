"""The Readout contract: one per mouse; features of the shared core in, that mouse's responses out."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from lightning_sensorium.data.batch import NeuronInfo


class Readout(nn.Module, ABC):
    """Per-mouse readout, built as ``Readout(in_shape=(C, H, W), neurons=NeuronInfo, <typed options>)``.

    The Encoder receives the class (or a partial of it, from YAML) as a factory
    ``Callable[[tuple[int, int, int], NeuronInfo], Readout]`` and calls it once per mouse.

    ``forward(features (B, C, T, H, W), shift (B, T, 2) | None, behavior (B, T, 4) | None)`` returns
    ``(B, N, T)``, before the Encoder's output nonlinearity. ``shift`` moves every neuron's read position by (x, y)
    in the normalised [-1, 1] frame. ``behavior`` is ``[pupil size, running speed, pupil x, pupil y]`` of the last
    ``T`` frames (the frames the features belong to), for readouts with a behaviour path (ViV1T's state encoder);
    the others ignore it.
    """

    def __init__(self, in_shape: tuple[int, int, int], neurons: NeuronInfo) -> None:
        super().__init__()
        c, h, w = in_shape
        self.in_shape: tuple[int, int, int] = (int(c), int(h), int(w))
        self.mouse_id = neurons.mouse_id
        self.num_neurons = neurons.num_neurons

    @abstractmethod
    def forward(self, features: Tensor, shift: Tensor | None = None, behavior: Tensor | None = None) -> Tensor:
        """Responses ``(B, N, T)``."""

    def regularizer(self) -> Tensor:
        """Penalty added to the training loss (default: none)."""
        param = next(self.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)


__all__ = ["Readout"]
