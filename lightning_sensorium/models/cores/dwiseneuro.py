"""DwiseNeuro core (SENSORIUM 2023, 1st place): a (2+1)D depthwise inverted-residual 3D CNN + "cortex".

Port of ``DepthwiseCore``, the global spatial pool and ``Cortex`` of
https://github.com/lRomul/sensorium/blob/main/src/models/dwiseneuro.py as ``configs/true_batch_001.py`` (stage 1,
``expansion=7``) and ``configs/distillation_001.py`` (stage 2, ``expansion=6``) configure them. The cortex, shared
by all mice, is part of the core; the core is not causal. Model, parameters and differences: docs/models.md,
"DwiseNeuro (`experiments/dwiseneuro.yaml`, `experiments/dwiseneuro_distill.yaml`)".
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sensorium.models.cores.base import Core
from lightning_sensorium.models.layers import DropPath, behavior_as_channels


def init_weights(module: nn.Module) -> None:
    """DwiseNeuro's init: conv weights ``N(0, sqrt(2 / fan_out))`` with ``fan_out = prod(kernel)·out / groups``, zero
    conv biases, BatchNorm γ = 1 and β = 0 (``src/utils.py`` ``init_weights``; applied to the whole model)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            fan_out = math.prod(m.kernel_size) * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def tile_channels(x: Tensor, channels: int) -> Tensor:
    """Repeat the channels (dim 1) cyclically and keep the first ``channels``: the parameter-free widening of the
    shortcuts (``[c0 … c63, c0 … c63]`` for 64 → 128)."""
    c = x.shape[1]
    if c == channels:
        return x
    reps = (1, math.ceil(channels / c)) + (1,) * (x.dim() - 2)
    return torch.tile(x, reps)[:, :channels]  # (B, channels, ...)


class PositionalEncoding3d(nn.Module):
    """Adds a fixed (not learned) sinusoidal encoding of the (T, H, W) position to a ``(B, C, T, H, W)`` input.

    ``ch = ceil(C / 6)·2`` channels per axis with frequencies ``f_k = 1 / 10000^(2k / ch)``, ``k < ch / 2``; the
    channel blocks are ``[sin(t f), cos(t f) | sin(y f), cos(y f) | sin(x f), cos(x f)]`` (positions are the
    integer indices), truncated to ``C``. The table is cached per (shape, dtype, device) as a plain attribute,
    outside ``state_dict`` and ``buffers()``, so weight averaging never sees it. This is the only way spatial position
    reaches the readout, which has no spatial part (docs/models.md: DwiseNeuro).

    Args:
        channels: ``C``, the input's channels.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.axis_channels = math.ceil(channels / 6) * 2
        self._cache: Tensor | None = None

    def encoding(self, t: int, h: int, w: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The ``(1, C, t, h, w)`` table (built in float32, then cast, as the original)."""
        ch = self.axis_channels
        inv_freq = 1.0 / (10000 ** (torch.arange(0, ch, 2, device=device, dtype=torch.float32) / ch))  # (ch/2,)

        def axis(n: int) -> Tensor:
            angle = inv_freq[:, None] * torch.arange(n, device=device, dtype=torch.float32)  # (ch/2, n)
            return torch.cat([angle.sin(), angle.cos()])  # (ch, n)

        emb = torch.cat(
            [
                axis(t)[:, :, None, None].expand(ch, t, h, w),
                axis(h)[:, None, :, None].expand(ch, t, h, w),
                axis(w)[:, None, None, :].expand(ch, t, h, w),
            ]
        )  # (3·ch, t, h, w)
        return emb[None, : self.channels].to(dtype).contiguous()  # (1, C, t, h, w)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 5 or x.shape[1] != self.channels:
            raise ValueError(
                f"PositionalEncoding3d({self.channels}) expects (B, {self.channels}, T, H, W), got {tuple(x.shape)}"
            )
        cache = self._cache
        if cache is None or cache.shape[2:] != x.shape[2:] or cache.dtype != x.dtype or cache.device != x.device:
            t, h, w = x.shape[2:]
            cache = self._cache = self.encoding(t, h, w, dtype=x.dtype, device=x.device)
        return x + cache  # broadcast over the batch

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


class SqueezeExcite3d(nn.Module):
    """Channel gate ``x · sigmoid(W2 SiLU(W1 mean_{T,H,W}(x)))``; ``W1``, ``W2`` are 1×1×1 convs with bias and
    ``channels // reduction`` hidden channels (the reduction applies to the expanded width)."""

    def __init__(self, channels: int, reduction: int = 32) -> None:
        super().__init__()
        hidden = channels // reduction
        if hidden < 1:
            raise ValueError(f"squeeze-excite: {channels} channels // reduction {reduction} leaves no hidden channel")
        self.conv_reduce = nn.Conv3d(channels, hidden, 1, bias=True)
        self.act = nn.SiLU(inplace=True)
        self.conv_expand = nn.Conv3d(hidden, channels, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean((2, 3, 4), keepdim=True)  # (B, C, 1, 1, 1)
        return x * torch.sigmoid(self.conv_expand(self.act(self.conv_reduce(s))))


class DepthwiseConv3d(nn.Conv3d):
    """A depthwise ``nn.Conv3d`` (``groups == channels``) whose ``(1, k, k)`` or ``(t, 1, 1)`` kernel runs as a 2D
    depthwise convolution on a view of the input: the same sums and the same parameters and state dict, ~2× faster
    on CPU, where the 3D depthwise kernel is the slowest op of a DwiseNeuro step (``benchmarks/
    bench_dwiseneuro_forward.py`` times ours against the original's ``nn.Conv3d``).

    * spatial ``(1, k, k)``: the frames become groups, ``(B, C·T, H, W)`` with each channel's filter repeated T times;
    * temporal ``(t, 1, 1)``: the pixels are flattened, ``(B, C, T, H·W)`` with a ``(t, 1)`` filter.
    """

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        kt, kh, kw = self.kernel_size
        depthwise = self.groups == self.in_channels == self.out_channels and self.padding_mode == "zeros"
        if not depthwise or isinstance(self.padding, str):
            return super().forward(x)
        if kt == 1 and (self.stride[0], self.padding[0]) == (1, 0):
            weight = self.weight[:, :, 0].repeat_interleave(t, dim=0)  # (C·T, 1, kh, kw): channel-major like the view
            bias = None if self.bias is None else self.bias.repeat_interleave(t)
            y = F.conv2d(
                x.reshape(b, c * t, h, w),  # (B, C·T, H, W): a view of a contiguous input
                weight,
                bias,
                self.stride[1:],
                self.padding[1:],
                self.dilation[1:],
                groups=c * t,
            )  # (B, C·T, H', W')
            return y.view(b, c, t, y.shape[-2], y.shape[-1])  # (B, C, T, H', W')
        if kh == kw == 1 and self.stride[1:] == (1, 1) and self.padding[1:] == (0, 0):
            y = F.conv2d(
                x.reshape(b, c, t, h * w),  # (B, C, T, H·W)
                self.weight[..., 0],  # (C, 1, kt, 1)
                self.bias,
                (self.stride[0], 1),
                (self.padding[0], 0),
                (self.dilation[0], 1),
                groups=c,
            )  # (B, C, T', H·W)
            return y.view(b, c, y.shape[2], h, w)  # (B, C, T', H, W)
        return super().forward(x)


def _conv_bn(conv: nn.Module, channels: int, act: bool) -> nn.Sequential:
    """``conv → BatchNorm3d [→ SiLU]`` (the original's conv + ``BatchNormAct``)."""
    layers = [conv, nn.BatchNorm3d(channels)]
    if act:
        layers.append(nn.SiLU(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual3d(nn.Module):
    """MobileNet-style block with a (2+1)D depthwise middle and a parameter-free shortcut.

    ``1×1×1 expand → BN → SiLU → depthwise (1,k,k) stride (1,s,s) → BN → SiLU → depthwise (t,1,1) → BN → SiLU →
    squeeze-excite → 1×1×1 project → BN``, all convs without bias, then ``DropPath(branch) + BN(shortcut)``. The
    shortcut is the input downsampled by nearest-neighbour to ``ceil(H/s) × ceil(W/s)`` and widened by
    :func:`tile_channels`; its BatchNorm (always present, even on an identity path) is its only parameter.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        spatial_kernel: side of the spatial depthwise kernel (odd; padded to keep the size).
        temporal_kernel: length of the temporal depthwise kernel (odd; symmetric padding: non-causal).
        spatial_stride: spatial stride of the spatial depthwise conv.
        expansion: the middle width is ``in_channels · expansion``.
        se_reduction: squeeze-excite reduction of the middle width.
        drop_path: stochastic-depth rate of the branch.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        spatial_kernel: int = 3,
        temporal_kernel: int = 5,
        spatial_stride: int = 1,
        expansion: int = 7,
        se_reduction: int = 32,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        mid = in_channels * expansion
        self.out_channels = out_channels
        self.spatial_stride = spatial_stride
        sk, tk = spatial_kernel, temporal_kernel
        self.conv_pw = _conv_bn(nn.Conv3d(in_channels, mid, 1, bias=False), mid, act=True)
        self.conv_spatial = _conv_bn(
            DepthwiseConv3d(
                mid,
                mid,
                (1, sk, sk),
                stride=(1, spatial_stride, spatial_stride),
                padding=(0, sk // 2, sk // 2),
                groups=mid,
                bias=False,
            ),
            mid,
            act=True,
        )
        self.conv_temporal = _conv_bn(
            DepthwiseConv3d(mid, mid, (tk, 1, 1), padding=(tk // 2, 0, 0), groups=mid, bias=False), mid, act=True
        )
        self.se = SqueezeExcite3d(mid, se_reduction)
        self.conv_pwl = _conv_bn(nn.Conv3d(mid, out_channels, 1, bias=False), out_channels, act=False)
        self.drop_path = DropPath(drop_path)
        self.norm_shortcut = nn.BatchNorm3d(out_channels)

    def shortcut(self, x: Tensor) -> Tensor:
        """Nearest downsampling to ``ceil(H/s) × ceil(W/s)``, channel tiling, BatchNorm."""
        if self.spatial_stride > 1:
            _, _, t, h, w = x.shape
            size = (t, math.ceil(h / self.spatial_stride), math.ceil(w / self.spatial_stride))
            x = F.interpolate(x, size=size, mode="nearest")  # (B, C, T, ceil(H/s), ceil(W/s))
        return self.norm_shortcut(tile_channels(x, self.out_channels))

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv_pwl(self.se(self.conv_temporal(self.conv_spatial(self.conv_pw(x)))))
        return self.drop_path(y) + self.shortcut(x)


class ShuffleLayer(nn.Module):
    """One cortex layer on ``(B, C, T)``: grouped 1×1 Conv1d (no bias) → BN → SiLU → channel shuffle between the
    groups, then ``DropPath(branch) + BN(tiled shortcut)``. Kernel 1: every frame is processed on its own.

    Args:
        in_channels: input channels.
        out_channels: output channels (divisible by ``groups``).
        groups: convolution groups; the shuffle interleaves them so the next layer mixes both halves.
        drop_path: stochastic-depth rate of the branch.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int = 2, drop_path: float = 0.0) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.groups = groups
        self.conv = nn.Conv1d(in_channels, out_channels, 1, groups=groups, bias=False)
        self.norm = nn.BatchNorm1d(out_channels)
        self.act = nn.SiLU(inplace=True)
        self.drop_path = DropPath(drop_path)
        self.norm_shortcut = nn.BatchNorm1d(out_channels)

    def shuffle(self, x: Tensor) -> Tensor:
        """``[g0 c0, g0 c1, …, g1 c0, …] → [g0 c0, g1 c0, g0 c1, g1 c1, …]`` (ShuffleNet)."""
        if self.groups == 1:
            return x
        b, c, t = x.shape
        x = x.view(b, self.groups, c // self.groups, t).transpose(1, 2)  # (B, C/g, g, T)
        return x.reshape(b, c, t)  # (B, C, T)

    def forward(self, x: Tensor) -> Tensor:
        y = self.shuffle(self.act(self.norm(self.conv(x))))  # (B, C_out, T)
        return self.drop_path(y) + self.norm_shortcut(tile_channels(x, self.out_channels))


class DwiseNeuroCore(Core):
    """DwiseNeuro's shared trunk: depthwise 3D CNN, global spatial average, and the cortex.

    ``forward(video (B, 1, T, H, W), behavior (B, 2, T), pupil_center (B, 2, T))`` → ``(B, cortex[-1], T, 1, 1)``.
    The inputs are used as given: the recipe feeds raw grey levels and raw signals (``data.normalization: raw``).
    With the defaults::

        video (B,1,T,36,64) ─► zero-pad to 64×64 (centred) ─► + behaviour, pupil centre as 4 constant maps (B,5,T,64,64)
          ─► stem: Conv3d 1×1×1 (5→64, no bias) ─► BN
          ─► 9 × [ + sinusoidal PositionalEncoding3d ─► InvertedResidual3d ]      (B, 256, T, 8, 8)
          ─► mean over H, W                                                          (B, 256, T)
          ─► cortex: 3 × ShuffleLayer 256→1024→2048→4096 (grouped 1×1 Conv1d)       (B, 4096, T)
          ─► features (B, 4096, T, 1, 1)

    The original's ``DwiseNeuro`` module holds ``core``, ``pool``, ``cortex`` and one ``Readout`` per mouse; the
    cortex is shared by all mice, so here it is part of the core and the per-mouse part is only
    :class:`~lightning_sensorium.models.readouts.dwiseneuro.DwiseNeuroReadout`. Every output frame belongs to its own
    input frame (``T' = T``), but the temporal convolutions are symmetric ``(5, 1, 1)`` with padding 2, so the core
    is **not causal**: with 9 blocks an output frame sees ±18 model frames (±36 raw frames at ``frame_step=2``), and
    the frames near both window ends see zero padding.

    Args:
        features: output channels of the stem (``features[0]``) and of block ``i`` (``features[i + 1]``; the last
            block keeps ``features[-1]``), as the original's ``core_features``.
        spatial_strides: spatial stride of each block (as many as ``features``).
        spatial_kernel: spatial depthwise kernel side.
        temporal_kernel: temporal depthwise kernel length (symmetric: non-causal).
        expansion: inverted-residual expansion ratio (7 in stage 1, 6 in the distillation stage).
        se_reduction: squeeze-excite reduction of the expanded width.
        cortex_features: output channels of the cortex layers.
        groups: groups of the cortex convolutions (and of the readout, which must match).
        drop_path: stochastic depth: block ``i`` of ``n`` uses ``drop_path · i / n``, every cortex layer ``drop_path``.
        pad_to: ``(height, width)`` the frames are zero-padded to, centred, before the behaviour maps are added
            (the original's 64×64 for 36×64 frames); None: no padding.
        behavior_channels: add pupil size and running speed as 2 constant image channels.
        pupil_channels: add the pupil centre (x, y) as 2 constant image channels.
        video_channels: channels of the video itself (1, grey).
    """

    def __init__(
        self,
        features: tuple[int, ...] = (64, 64, 64, 64, 128, 128, 128, 256, 256),
        spatial_strides: tuple[int, ...] = (2, 1, 1, 1, 2, 1, 1, 2, 1),
        spatial_kernel: int = 3,
        temporal_kernel: int = 5,
        expansion: int = 7,
        se_reduction: int = 32,
        cortex_features: tuple[int, ...] = (1024, 2048, 4096),
        groups: int = 2,
        drop_path: float = 0.1,
        pad_to: tuple[int, int] | None = (64, 64),
        behavior_channels: bool = True,
        pupil_channels: bool = True,
        video_channels: int = 1,
    ) -> None:
        super().__init__()
        if not features or len(features) != len(spatial_strides):
            raise ValueError(
                f"features ({len(features)}) and spatial_strides ({len(spatial_strides)}) need one entry per block"
            )
        if spatial_kernel % 2 == 0 or temporal_kernel % 2 == 0:
            raise ValueError(f"spatial_kernel={spatial_kernel} and temporal_kernel={temporal_kernel} must be odd")
        for c in cortex_features:
            if c % groups:
                raise ValueError(f"cortex_features {list(cortex_features)} must be divisible by groups={groups}")
        self.pad_to = None if pad_to is None else (int(pad_to[0]), int(pad_to[1]))
        self.behavior_channels, self.pupil_channels = behavior_channels, pupil_channels
        self.input_channels = video_channels + 2 * behavior_channels + 2 * pupil_channels
        self.spatial_strides = tuple(spatial_strides)
        self.groups = groups

        self.stem = nn.Sequential(
            nn.Conv3d(self.input_channels, features[0], 1, bias=False), nn.BatchNorm3d(features[0])
        )
        n = len(features)
        blocks: list[nn.Module] = []
        for i, (c_in, stride) in enumerate(zip(features, spatial_strides, strict=True)):
            c_out = features[min(i + 1, n - 1)]
            blocks.append(PositionalEncoding3d(c_in))
            blocks.append(
                InvertedResidual3d(
                    c_in,
                    c_out,
                    spatial_kernel=spatial_kernel,
                    temporal_kernel=temporal_kernel,
                    spatial_stride=stride,
                    expansion=expansion,
                    se_reduction=se_reduction,
                    drop_path=drop_path * i / n,
                )
            )
        # Alternating [encoding, block] as the original's `core.blocks` (indices 2i and 2i + 1).
        self.blocks = nn.Sequential(*blocks)
        cortex = []
        c_prev = features[-1]
        for c in cortex_features:
            cortex.append(ShuffleLayer(c_prev, c, groups=groups, drop_path=drop_path))
            c_prev = c
        self.cortex = nn.Sequential(*cortex)
        self.out_channels = c_prev
        init_weights(self)

    def inputs(self, video: Tensor, behavior: Tensor | None, pupil_center: Tensor | None) -> Tensor:
        """The 5-channel input ``(B, 5, T, *pad_to)``: the video zero-padded (centred), then the signal maps over the
        whole padded frame (``StackInputsProcessor``)."""
        if self.behavior_channels and behavior is None:
            raise ValueError("DwiseNeuroCore(behavior_channels=True) needs `behavior` (B, 2, T)")
        if self.pupil_channels and pupil_center is None:
            raise ValueError("DwiseNeuroCore(pupil_channels=True) needs `pupil_center` (B, 2, T)")
        if self.pad_to is not None:
            h, w = video.shape[-2:]
            th, tw = self.pad_to
            if h > th or w > tw:
                raise ValueError(f"DwiseNeuroCore(pad_to={self.pad_to}): frames of {h}×{w} are larger than the target")
            top, left = (th - h) // 2, (tw - w) // 2
            video = F.pad(video, (left, tw - w - left, top, th - h - top))  # (B, C, T, th, tw)
        return behavior_as_channels(
            video, behavior if self.behavior_channels else None, pupil_center if self.pupil_channels else None
        )  # (B, input_channels, T, th, tw)

    def trunk(self, x: Tensor) -> Tensor:
        """Stem and blocks on the stacked input: ``(B, 5, T, H, W) → (B, features[-1], T, H/8, W/8)``."""
        return self.blocks(self.stem(x))

    def forward(self, video: Tensor, behavior: Tensor | None = None, pupil_center: Tensor | None = None) -> Tensor:
        x = self.trunk(self.inputs(video, behavior, pupil_center))  # (B, 256, T, 8, 8)
        x = self.cortex(x.mean((3, 4)))  # (B, 256, T) → (B, 4096, T)
        return x[..., None, None]  # (B, 4096, T, 1, 1)

    def output_shape(self, input_shape: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """``(cortex_features[-1], T, 1, 1)``: every frame is kept and space is pooled away (no dry run)."""
        return self.out_channels, input_shape[1], 1, 1


#: Our parameter name → the original ``DwiseNeuro.state_dict()`` name (applied in order, first match wins).
_ORIGINAL_NAMES: list[tuple[str, str]] = [
    (r"^stem\.1\.", "core.stem.1.bn."),
    (r"^stem\.0\.", "core.stem.0."),
    (r"^blocks\.(\d+)\.conv_spatial\.0\.", r"core.blocks.\1.spat_covn_dw.0."),
    (r"^blocks\.(\d+)\.conv_spatial\.1\.", r"core.blocks.\1.spat_covn_dw.1.bn."),
    (r"^blocks\.(\d+)\.conv_temporal\.0\.", r"core.blocks.\1.temp_covn_dw.0."),
    (r"^blocks\.(\d+)\.conv_temporal\.1\.", r"core.blocks.\1.temp_covn_dw.1.bn."),
    (r"^blocks\.(\d+)\.(conv_pw|conv_pwl)\.0\.", r"core.blocks.\1.\2.0."),
    (r"^blocks\.(\d+)\.(conv_pw|conv_pwl)\.1\.", r"core.blocks.\1.\2.1.bn."),
    (r"^blocks\.(\d+)\.se\.", r"core.blocks.\1.se."),
    (r"^blocks\.(\d+)\.norm_shortcut\.", r"core.blocks.\1.bn_sc.bn."),
    (r"^cortex\.(\d+)\.conv\.", r"cortex.layers.\1.conv."),
    (r"^cortex\.(\d+)\.norm\.", r"cortex.layers.\1.bn.bn."),
    (r"^cortex\.(\d+)\.norm_shortcut\.", r"cortex.layers.\1.bn_sc.bn."),
]


def original_key(name: str) -> str:
    """The original ``DwiseNeuro`` state-dict key of one of :class:`DwiseNeuroCore`'s keys, e.g.
    ``blocks.1.conv_spatial.1.weight`` → ``core.blocks.1.spat_covn_dw.1.bn.weight``.

    Load a checkpoint of lRomul/sensorium (``model.nn_module.state_dict()``) with
    ``core.load_state_dict({k: sd[original_key(k)] for k in core.state_dict()})``.
    """
    for pattern, repl in _ORIGINAL_NAMES:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    raise KeyError(f"no original name for DwiseNeuroCore parameter {name!r}")


__all__ = [
    "DwiseNeuroCore",
    "InvertedResidual3d",
    "PositionalEncoding3d",
    "ShuffleLayer",
    "SqueezeExcite3d",
    "init_weights",
    "original_key",
    "tile_channels",
]
