"""Factorized 3D core of the SENSORIUM 2023 factorized baseline: spatial then temporal valid convolutions, causal.

Port of neuralpredictors' ``Factorized3dCore``
(https://github.com/sinzlab/neuralpredictors/blob/main/neuralpredictors/layers/cores/conv3d.py) as the 2023
benchmark notebook configures it
(https://github.com/ecker-lab/sensorium_2023/blob/main/notebooks/benchmarks_training.ipynb). Model, parameters and
differences: docs/models.md, "Factorized baseline (`experiments/factorized.yaml`)".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sensorium.models.cores.base import Core
from lightning_sensorium.models.layers import (
    constant_maps_footprint,
    depth_laplace_l21d,
    laplace_l2norm,
    strided_spatial_conv,
)


def _same(kernel: int, padding: bool) -> tuple[int, int, int]:
    """Conv3d padding of a ``(1, k, k)`` spatial kernel: ``k // 2`` on both spatial axes if ``padding``, else none."""
    return (0, kernel // 2, kernel // 2) if padding else (0, 0, 0)


def _int_padding(conv: nn.Conv3d) -> tuple[int, ...]:
    """The padding of a conv built with a tuple (never a string such as ``"same"`` here)."""
    assert not isinstance(conv.padding, str)
    return conv.padding


class _FactorizedBlock(nn.Sequential):
    """Spatial ``(1, k, k)`` conv (valid, or zero-padded to keep H × W) → temporal ``(t, 1, 1)`` conv (valid) →
    BatchNorm3d → ELU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        spatial: int,
        temporal: int,
        momentum: float,
        padding: bool,
        stride: int = 1,
    ) -> None:
        super().__init__()
        self.conv_spatial = nn.Conv3d(
            in_channels,
            out_channels,
            (1, spatial, spatial),
            stride=(1, stride, stride),
            padding=_same(spatial, padding),
        )
        self.conv_temporal = nn.Conv3d(out_channels, out_channels, (temporal, 1, 1))
        self.norm = nn.BatchNorm3d(out_channels, momentum=momentum)
        self.nonlin = nn.ELU()


class Factorized3dCore(Core):
    """Stack of factorized (spatial, then temporal) valid 3D convolutions: the factorized baseline's core.

    Input channels are the video's, then the behaviour maps, then the pupil-centre maps, as enabled (default
    1 + 2 = 3, the baseline's). Each signal is broadcast over H × W by
    :func:`~lightning_sensorium.models.layers.behavior_as_channels` inside :meth:`forward`. Each layer::

        x ─► Conv3d (1, k, k) ─► Conv3d (t, 1, 1) ─► BatchNorm3d ─► ELU ─► y
             spatial, bias       temporal, bias      affine, momentum 0.7

    All convolutions are valid (``padding=True`` zero-pads the spatial ones, as the original offers), stride 1, with
    a bias even before BatchNorm, and no nonlinearity between the spatial and the temporal convolution. With the
    defaults a (3, 80, 36, 64) input becomes (128, 62, 18, 46): 18 frames are lost, the receptive field is 19 frames
    × 19 × 19 pixels, and the core is causal — output frame ``k`` sees input frames ``k … k + 18`` and belongs to
    input frame ``k + 18`` (the last).

    Args:
        hidden_channels: output channels of each layer (the number of layers is its length).
        spatial_input_kernel: spatial kernel size (square) of the first layer.
        temporal_input_kernel: temporal kernel size of the first layer.
        spatial_hidden_kernel: spatial kernel size (square) of the other layers.
        temporal_hidden_kernel: temporal kernel size of the other layers.
        batch_norm_momentum: BatchNorm momentum, PyTorch convention (0.7: running stats ≈ the last few batches).
        video_channels: channels of the video itself (1, grey).
        behavior_channels: add pupil size and running speed as 2 constant image channels.
        pupil_channels: add the pupil centre as 2 channels too (off in the baseline: it drives the shifter).
        padding: zero-pad the spatial convolutions to keep H × W (the original's ``padding``; off in the baseline,
            whose valid convolutions lose ``Σ (k − 1)`` border pixels — 18 of 36 rows with the defaults, so neurons
            whose receptive fields lie in the outer quarters are read at the border of the feature map). Temporal
            convolutions stay valid (causal) either way.
        input_stride: spatial stride of the first spatial convolution (1 in the baseline). 2 runs every later layer
            and the readout on a half-resolution grid — a quarter of their work; the readout's positions are in
            normalised coordinates, so they mean the same place on the screen at any stride.
        spatial_reg_weight: weight of the Laplace smoothness of the first spatial filters (``gamma_input_spatial``).
        temporal_reg_weight: weight of the 1D Laplace smoothness of the first temporal filters
            (``gamma_input_temporal``).
    """

    def __init__(
        self,
        hidden_channels: tuple[int, ...] = (32, 64, 128),
        spatial_input_kernel: int = 11,
        temporal_input_kernel: int = 11,
        spatial_hidden_kernel: int = 5,
        temporal_hidden_kernel: int = 5,
        batch_norm_momentum: float = 0.7,
        video_channels: int = 1,
        behavior_channels: bool = True,
        pupil_channels: bool = False,
        padding: bool = False,
        input_stride: int = 1,
        spatial_reg_weight: float = 10.0,
        temporal_reg_weight: float = 0.01,
    ) -> None:
        super().__init__()
        if not hidden_channels:
            raise ValueError("hidden_channels needs at least one layer")
        self.video_channels = video_channels
        if input_stride < 1:
            raise ValueError(f"input_stride must be ≥ 1, got {input_stride}")
        self.behavior_channels = behavior_channels
        self.pupil_channels = pupil_channels
        self.spatial_reg_weight = spatial_reg_weight
        self.temporal_reg_weight = temporal_reg_weight
        self.input_channels = video_channels + 2 * behavior_channels + 2 * pupil_channels
        blocks = []
        in_channels = self.input_channels
        for i, out_channels in enumerate(hidden_channels):
            spatial = spatial_input_kernel if i == 0 else spatial_hidden_kernel
            temporal = temporal_input_kernel if i == 0 else temporal_hidden_kernel
            stride = input_stride if i == 0 else 1
            blocks.append(
                _FactorizedBlock(in_channels, out_channels, spatial, temporal, batch_norm_momentum, padding, stride)
            )
            in_channels = out_channels
        self.layers = nn.Sequential(*blocks)
        self.out_channels = in_channels
        # Valid convolutions shrink each axis by (kernel − 1) per layer.
        self._frames_lost = sum(b.conv_temporal.kernel_size[0] - 1 for b in blocks)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-normal conv weights and zero conv biases (``Core3d.init_conv``); BatchNorm keeps its defaults."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.xavier_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, video: Tensor, behavior: Tensor | None = None, pupil_center: Tensor | None = None) -> Tensor:
        if self.behavior_channels and behavior is None:
            raise ValueError("Factorized3dCore(behavior_channels=True) needs `behavior` (B, 2, T)")
        if self.pupil_channels and pupil_center is None:
            raise ValueError("Factorized3dCore(pupil_channels=True) needs `pupil_center` (B, 2, T)")
        enabled = ((behavior, self.behavior_channels), (pupil_center, self.pupil_channels))
        signals = [s for s, on in enabled if on and s is not None]  # checked above: none is missing
        block = self._input_block()
        x = self._input_conv(video, torch.cat(signals, dim=1) if signals else None)  # (B, C0, T, H', W')
        x = block.nonlin(block.norm(block.conv_temporal(x)))  # (B, C0, T − t0 + 1, H', W')
        return self.layers[1:](x)  # (B, C', T − lost, H', W'): see output_shape

    def _input_conv(self, video: Tensor, signals: Tensor | None) -> Tensor:
        """The first spatial convolution of ``[video, signals as constant maps]`` (:func:`behavior_as_channels`),
        computed as the convolution of the video alone plus each signal times its filter's footprint
        (:func:`constant_maps_footprint`): the same sum, a third of the multiply-adds with 2 behaviour channels."""
        conv = self._input_block().conv_spatial
        v, (_, sh, sw), (_, ph, pw) = self.video_channels, conv.stride, _int_padding(conv)
        # The same sum, ~2.5× faster than oneDNN's strided kernel on CPU (not measured on a GPU: cuDNN keeps its own).
        if sh > 1 and sh == sw and ph == pw and video.device.type == "cpu":
            x = strided_spatial_conv(video, conv.weight[:, :v], conv.bias, sh, ph)  # (B, C0, T, H', W')
        else:
            x = F.conv3d(video, conv.weight[:, :v], conv.bias, conv.stride, conv.padding)  # (B, C0, T, H', W')
        if signals is None:
            return x
        h, w = video.shape[-2:]
        footprint = constant_maps_footprint(conv.weight[:, v:, 0], h, w, (ph, pw), (sh, sw))  # (S, C0, H', W')
        return x + torch.einsum("bst,sohw->bothw", signals.to(x.dtype), footprint.to(x.dtype))  # (B, C0, T, H', W')

    def _input_block(self) -> _FactorizedBlock:
        block = self.layers[0]
        assert isinstance(block, _FactorizedBlock)
        return block

    def regularizer(self) -> Tensor:
        """``spatial_reg_weight · LaplaceL2norm(W_spatial0) + temporal_reg_weight · DepthLaplaceL21d(W_temporal0)``."""
        block = self._input_block()
        spatial = block.conv_spatial.weight[:, :, 0]  # (O, I, k, k)
        temporal = block.conv_temporal.weight[:, :, :, 0, 0]  # (O, O, t)
        return self.spatial_reg_weight * laplace_l2norm(spatial) + self.temporal_reg_weight * depth_laplace_l21d(
            temporal
        )

    def output_shape(self, input_shape: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        _, t, h, w = input_shape
        for block in self.layers:
            assert isinstance(block, _FactorizedBlock)
            conv = block.conv_spatial
            (_, k, _), (_, stride, _), (_, pad, _) = conv.kernel_size, conv.stride, _int_padding(conv)
            h, w = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
        return self.out_channels, t - self._frames_lost, h, w


__all__ = ["Factorized3dCore"]
