"""Encoder = one shared core + per-mouse readouts (+ optional per-mouse shifters) + an output nonlinearity.

Plain PyTorch (no Lightning), usable in notebooks and tests. The LightningModule builds it with
:meth:`Encoder.build` from factories chosen in YAML and the neuron information linked from the data. The data flow
follows ``VideoFiringRateEncoder``:
https://github.com/ecker-lab/sensorium_2023/blob/main/sensorium/models/video_encoder.py
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from lightning_sensorium.data.batch import NeuronInfo
from lightning_sensorium.models.cores.base import Core
from lightning_sensorium.models.layers import ELU1
from lightning_sensorium.models.readouts.base import Readout

#: ``(in_shape=(C, H, W), neurons) -> Readout``: a Readout class or a partial of one (YAML ``class_path``).
ReadoutFactory = Callable[[tuple[int, int, int], NeuronInfo], Readout]
#: ``() -> nn.Module`` mapping a pupil centre ``(..., 2)`` to a readout shift ``(..., 2)``.
ShifterFactory = Callable[[], nn.Module]


class Encoder(nn.Module):
    """Predicts one mouse's responses ``(B, N, T')`` from ``video (B, C, T, H, W)`` and behaviour.

    The responses belong to the last ``T'`` input frames (``T' = T − core.lost_frames``), like the core's output.

    Args:
        core: the shared core.
        readouts: ``mouse_id → Readout``.
        shifters: ``mouse_id → shifter`` (pupil centre → readout shift), or None.
        output_activation: final nonlinearity (default ``ELU(x) + 1``).
        float32_readout: under autocast (``bf16-mixed``, ``16-mixed``), run the shifters, readouts and output
            activation in float32 on float32 features: bf16's 8-bit mantissa rounds the readout's positions and
            the rates the Poisson loss takes the log of. The core, where the time goes, stays in low precision.
    """

    def __init__(
        self,
        core: Core,
        readouts: nn.ModuleDict,
        shifters: nn.ModuleDict | None = None,
        output_activation: nn.Module | None = None,
        float32_readout: bool = False,
    ) -> None:
        super().__init__()
        self.core = core
        self.readouts = readouts
        self.shifters = shifters
        self.output_activation = output_activation if output_activation is not None else ELU1()
        self.float32_readout = float32_readout

    @classmethod
    def build(
        cls,
        core: Core,
        readout: ReadoutFactory,
        neurons: Mapping[str, NeuronInfo],
        shifter: ShifterFactory | None = None,
        output_activation: nn.Module | None = None,
        video_shape: tuple[int, int] = (36, 64),
        frames: int = 80,
        float32_readout: bool = False,
    ) -> Encoder:
        """One readout (and shifter) per mouse in ``neurons``, sized by the core's output for a video of shape
        ``(1, frames, *video_shape)``."""
        c, _, h, w = core.output_shape((1, frames, *video_shape))
        readouts = nn.ModuleDict({mouse: readout((c, h, w), info) for mouse, info in neurons.items()})
        shifters = nn.ModuleDict({mouse: shifter() for mouse in neurons}) if shifter is not None else None
        return cls(core, readouts, shifters, output_activation, float32_readout)

    def forward(
        self, video: Tensor, mouse_id: str, behavior: Tensor | None = None, pupil_center: Tensor | None = None
    ) -> Tensor:
        features = self.core(video, behavior, pupil_center)  # (B, C', T', H', W')
        return self.read(features, mouse_id, behavior, pupil_center)

    def read(
        self, features: Tensor, mouse_id: str, behavior: Tensor | None = None, pupil_center: Tensor | None = None
    ) -> Tensor:
        """Core features ``(B, C', T', H', W')`` → ``mouse_id``'s responses ``(B, N, T')`` (shifter, readout,
        activation). Separate from :meth:`forward` so one core pass can feed several mice's readouts."""
        device = features.device.type
        if self.float32_readout and torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return self._read(features.float(), mouse_id, behavior, pupil_center)
        return self._read(features, mouse_id, behavior, pupil_center)

    def _read(
        self, features: Tensor, mouse_id: str, behavior: Tensor | None = None, pupil_center: Tensor | None = None
    ) -> Tensor:
        t_out = features.shape[2]
        shift = None
        if self.shifters is not None:
            if pupil_center is None:
                raise ValueError("this Encoder has shifters: pass `pupil_center` (B, 2, T)")
            pupil = pupil_center[..., -t_out:].transpose(1, 2)  # (B, T', 2): the core's last T' frames
            shift = self.shifters[mouse_id](pupil)  # (B, T', 2)
        signals = None
        if behavior is not None and pupil_center is not None:
            signals = torch.cat([behavior, pupil_center], dim=1)[..., -t_out:].transpose(1, 2)  # (B, T', 4)
        return self.output_activation(self.readouts[mouse_id](features, shift, signals))  # (B, N, T')

    def regularizer(self, mouse_id: str) -> Tensor:
        """The core's penalty plus ``mouse_id``'s readout penalty (the shifters have none, as in the original)."""
        return self.core.regularizer() + self.readouts[mouse_id].regularizer()

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``core``: the core's parameters; ``readout``: all others (readouts, shifters, output activation)."""
        core = list(self.core.parameters())
        core_ids = {id(p) for p in core}
        return {"core": core, "readout": [p for p in self.parameters() if id(p) not in core_ids]}


__all__ = ["Encoder", "ReadoutFactory", "ShifterFactory"]
