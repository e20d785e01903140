"""DwiseNeuro's per-mouse readout (docs/models.md: DwiseNeuro): channel dropout and a grouped 1×1 convolution over time.

Port of ``Readout`` of https://github.com/lRomul/sensorium/blob/main/src/models/dwiseneuro.py without its
``Softplus(beta=0.07)`` gate, which is the Encoder's output activation here (``model.output_activation`` in
``experiments/dwiseneuro.yaml``). There is no spatial readout: the core pools space away, and every neuron is a
linear read of one half of the cortex's channels at each frame.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from lightning_sensorium.data.batch import NeuronInfo
from lightning_sensorium.models.readouts.base import Readout


class DwiseNeuroReadout(Readout):
    """``Dropout1d → Conv1d(C → ceil(N/g)·g, k=1, groups=g, bias)`` sliced to the first ``N`` outputs.

    With ``g = 2`` neurons ``[0, N'/2)`` (``N' = ceil(N/2)·2``) read cortex channels ``[0, C/2)`` and the rest read
    ``[C/2, C)``. ``shift`` and ``behavior`` are ignored (behaviour enters the core as image channels).

    Init as ``init_weights``: weight ``N(0, sqrt(2 / fan_out))`` with ``fan_out = N'/g``, bias 0 (no mean-response
    init).

    Args:
        in_shape: ``(C, 1, 1)``: the core's pooled features.
        neurons: the mouse's neurons.
        groups: convolution groups (must divide ``C``; the original uses the cortex's 2).
        dropout: ``Dropout1d`` rate: whole feature channels are dropped per sample.
    """

    def __init__(
        self, in_shape: tuple[int, int, int], neurons: NeuronInfo, groups: int = 2, dropout: float = 0.4
    ) -> None:
        super().__init__(in_shape, neurons)
        c, h, w = self.in_shape
        if (h, w) != (1, 1):
            raise ValueError(f"DwiseNeuroReadout reads spatially pooled features (C, 1, 1); got in_shape {in_shape}")
        if c % groups:
            raise ValueError(f"DwiseNeuroReadout(groups={groups}) must divide the {c} feature channels")
        self.groups = groups
        self.dropout = nn.Dropout1d(dropout)
        self.conv = nn.Conv1d(c, math.ceil(self.num_neurons / groups) * groups, 1, groups=groups, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        fan_out = self.conv.out_channels // self.groups
        nn.init.normal_(self.conv.weight, 0.0, math.sqrt(2.0 / fan_out))
        assert self.conv.bias is not None
        nn.init.zeros_(self.conv.bias)

    def forward(self, features: Tensor, shift: Tensor | None = None, behavior: Tensor | None = None) -> Tensor:
        x = features.flatten(2)  # (B, C, T, 1, 1) → (B, C, T)
        return self.conv(self.dropout(x))[:, : self.num_neurons]  # (B, N, T)


__all__ = ["DwiseNeuroReadout"]
