"""Encoder = one shared core + per-mouse readouts (+ optional per-mouse shifters) + output nonlinearity.

Plain PyTorch (no Lightning): usable in notebooks and tests. The LightningModule builds it with
:meth:`Encoder.build` from factories chosen in YAML and the neuron information linked from the data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor, nn

from lightning_sensorium.data.batch import NeuronInfo
from lightning_sensorium.models.cores.base import Core
from lightning_sensorium.models.layers import ELU1
from lightning_sensorium.models.readouts.base import Readout

ReadoutFactory = Callable[[tuple[int, int, int], NeuronInfo], Readout]
ShifterFactory = Callable[[], nn.Module]


class Encoder(nn.Module):
    """Predicts responses ``(B, N, T')`` of one mouse from ``video (B, C, T, H, W)`` and behaviour.

    Args:
        core: the shared core.
        readouts: ``mouse_id → Readout``.
        shifters: ``mouse_id → shifter`` (pupil centre → readout shift), or None.
        output_activation: final nonlinearity (default ``ELU(x) + 1``).
    """

    def __init__(
        self,
        core: Core,
        readouts: nn.ModuleDict,
        shifters: nn.ModuleDict | None = None,
        output_activation: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.core = core
        self.readouts = readouts
        self.shifters = shifters
        self.output_activation = output_activation if output_activation is not None else ELU1()

    @classmethod
    def build(
        cls,
        core: Core,
        readout: ReadoutFactory,
        neurons: Mapping[str, NeuronInfo],
        shifter: ShifterFactory | None = None,
        output_activation: nn.Module | None = None,
        video_shape: tuple[int, int] = (36, 64),
        frames: int = 64,
    ) -> Encoder:
        """Build the per-mouse parts for ``neurons`` from the core's output shape on ``video_shape`` frames."""
        c, _, h, w = core.output_shape(frames, *video_shape)
        readouts = nn.ModuleDict({m: readout((c, h, w), info) for m, info in neurons.items()})
        shifters = nn.ModuleDict({m: shifter() for m in neurons}) if shifter is not None else None
        return cls(core, readouts, shifters, output_activation)

    def forward(
        self, video: Tensor, mouse_id: str, behavior: Tensor | None = None, pupil_center: Tensor | None = None
    ) -> Tensor:
        features = self.core(video, behavior, pupil_center)  # (B, C, T', H', W')
        t_out = features.shape[2]
        shift = None
        if self.shifters is not None and pupil_center is not None:
            pc = pupil_center[..., -t_out:].transpose(1, 2)  # (B, T', 2), aligned to the last T' frames
            shift = self.shifters[mouse_id](pc)  # (B, T', 2)
        return self.output_activation(self.readouts[mouse_id](features, shift))  # (B, N, T')

    def regularizer(self, mouse_id: str) -> Tensor:
        """Core penalty plus the mouse's readout penalty."""
        return self.core.regularizer() + self.readouts[mouse_id].regularizer()

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``core`` and ``readout`` (readouts + shifters) parameters, for separate learning rates."""
        per_mouse = list(self.readouts.parameters())
        if self.shifters is not None:
            per_mouse += list(self.shifters.parameters())
        return {"core": list(self.core.parameters()), "readout": per_mouse}


__all__ = ["Encoder", "ReadoutFactory", "ShifterFactory"]
