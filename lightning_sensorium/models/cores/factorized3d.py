"""Factorized 3D core of the SENSORIUM 2023 factorized baseline.

Port of neuralpredictors' ``Factorized3dCore`` as the 2023 benchmark notebook configures it (models.md §2):
https://github.com/sinzlab/neuralpredictors/blob/main/neuralpredictors/layers/cores/conv3d.py
Each layer is a spatial ``(1, k, k)`` convolution, then a temporal ``(t, 1, 1)`` one (both with bias, no
nonlinearity between), then BatchNorm (momentum 0.7) and ELU. Convolutions are valid, so the core is causal:
output frame k sees input frames k … k + 18 (36×64×80 → 18×46×62 with the default kernels).
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_sensorium.models.cores.base import Core
from lightning_sensorium.models.layers import behavior_as_channels, depth_laplace_l2_1d, laplace_l2


class _FactorizedLayer(nn.Sequential):
    def __init__(self, cin: int, cout: int, spatial: int, temporal: int, momentum: float) -> None:
        super().__init__()
        self.conv_spatial = nn.Conv3d(cin, cout, (1, spatial, spatial))
        self.conv_temporal = nn.Conv3d(cout, cout, (temporal, 1, 1))
        self.norm = nn.BatchNorm3d(cout, momentum=momentum)
        self.nonlinearity = nn.ELU()


class Factorized3dCore(Core):
    """Stack of factorized (spatial then temporal) valid 3D convolutions.

    Args:
        hidden_channels: output channels of each layer.
        spatial_input_kernel: spatial kernel of the first layer.
        temporal_input_kernel: temporal kernel of the first layer.
        spatial_hidden_kernel: spatial kernel of the other layers.
        temporal_hidden_kernel: temporal kernel of the other layers.
        batch_norm_momentum: BatchNorm momentum (the original's 0.7 makes running stats ≈ the last batch).
        behavior_channels: feed pupil size and running speed as two extra constant image channels.
        pupil_channels: also feed the pupil centre as two channels (off in the baseline: it drives a shifter).
        spatial_reg_weight: weight of the Laplace smoothness of the first spatial filters (``gamma_input_spatial``).
        temporal_reg_weight: weight of the 1D Laplace smoothness of the first temporal filters.
    """

    def __init__(
        self,
        hidden_channels: tuple[int, ...] = (32, 64, 128),
        spatial_input_kernel: int = 11,
        temporal_input_kernel: int = 11,
        spatial_hidden_kernel: int = 5,
        temporal_hidden_kernel: int = 5,
        batch_norm_momentum: float = 0.7,
        behavior_channels: bool = True,
        pupil_channels: bool = False,
        spatial_reg_weight: float = 10.0,
        temporal_reg_weight: float = 0.01,
    ) -> None:
        super().__init__()
        self.behavior_channels, self.pupil_channels = behavior_channels, pupil_channels
        self.spatial_reg_weight, self.temporal_reg_weight = spatial_reg_weight, temporal_reg_weight
        cin = 1 + 2 * behavior_channels + 2 * pupil_channels
        layers = []
        for i, cout in enumerate(hidden_channels):
            spatial = spatial_input_kernel if i == 0 else spatial_hidden_kernel
            temporal = temporal_input_kernel if i == 0 else temporal_hidden_kernel
            layers.append(_FactorizedLayer(cin, cout, spatial, temporal, batch_norm_momentum))
            cin = cout
        self.layers = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)  # type: ignore[arg-type]
        self.lost_frames = sum(layer.conv_temporal.kernel_size[0] - 1 for layer in layers)

    def forward(self, video: Tensor, behavior: Tensor | None = None, pupil_center: Tensor | None = None) -> Tensor:
        x = behavior_as_channels(
            video,
            behavior if self.behavior_channels else None,
            pupil_center if self.pupil_channels else None,
        )  # (B, C_in, T, H, W)
        return self.layers(x)  # (B, C, T - lost_frames, H', W')

    def regularizer(self) -> Tensor:
        first = self.layers[0]
        spatial = first.conv_spatial.weight[:, :, 0]  # (O, I, k, k)
        temporal = first.conv_temporal.weight[:, :, :, 0, 0]  # (O, I, t)
        return self.spatial_reg_weight * laplace_l2(spatial) + self.temporal_reg_weight * depth_laplace_l2_1d(temporal)

    def output_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        h, w = height, width
        for layer in self.layers:
            k = int(layer.conv_spatial.kernel_size[1])
            h, w = h - k + 1, w - k + 1
        last: _FactorizedLayer = self.layers[-1]  # type: ignore[assignment]
        channels = last.conv_temporal.out_channels
        return channels, frames - self.lost_frames, h, w
