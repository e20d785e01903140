"""Blocks and functions shared by several architectures: each piece of logic lives here once.

Output nonlinearities (:class:`ELU1`, :class:`CalciumELU1`, :class:`Exp`), :class:`DropPath`, behaviour and pupil
centre as constant image channels (:func:`behavior_as_channels`) and the cheaper ways to convolve them
(:func:`constant_maps_footprint`, :func:`strided_spatial_conv`), and the first-layer smoothness penalties
(:func:`laplace_l2norm`, :func:`depth_laplace_l21d`). Where each model uses them: docs/models.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ELU1(nn.Module):
    """``ELU(x + offset) + 1``: a positive firing rate (``VideoFiringRateEncoder``, ``elu_offset=0``).

    The output nonlinearity of the baselines and Dynamic-V1FM.

    https://github.com/ecker-lab/sensorium_2023/blob/main/sensorium/models/video_encoder.py

    Args:
        offset: shift of the input before the ELU.
    """

    def __init__(self, offset: float = 0.0) -> None:
        super().__init__()
        self.offset = offset

    def forward(self, x: Tensor) -> Tensor:
        return F.elu(x + self.offset) + 1.0

    def extra_repr(self) -> str:
        return f"offset={self.offset}"


class CalciumELU1(ELU1):
    """``ELU(x + offset) + 1``, then a learned causal smoothing over the last ``taps`` output steps.

    Two-photon traces are a rate seen through a calcium indicator: ``rate → nonlinearity → shift by the eye → slow
    indicator kinetics``. A core's temporal filters come before the readout, so without this the readout's
    per-frame shift (eye movements) and the output nonlinearity act after all temporal filtering: a saccade makes
    the prediction jump where the recorded trace rises and decays over a few hundred ms. The kernel is
    ``softmax(logits)`` (positive, summing to 1, so the mean rate and its positivity are kept), initialised close
    to the identity; before the first step the trace is taken to have sat at its first value (no frames lost).
    Not in the original baselines (an option: ``model.output_activation``).

    Args:
        taps: output steps the smoothing reaches back (1: plain :class:`ELU1`).
        offset: shift of the input before the ELU.
    """

    def __init__(self, taps: int = 6, offset: float = 0.0) -> None:
        super().__init__(offset)
        if taps < 1:
            raise ValueError(f"CalciumELU1: taps must be ≥ 1, got {taps}")
        self.taps = taps
        logits = torch.full((taps,), -4.0)
        logits[0] = 0.0  # ≈ 0.92 on the current step at first
        self.logits = nn.Parameter(logits)

    def kernel(self) -> Tensor:
        """``(taps,)``: the weight of the rate ``k`` steps ago, ``k = 0 … taps − 1``."""
        return torch.softmax(self.logits, dim=0)

    def forward(self, x: Tensor) -> Tensor:
        rate = super().forward(x)  # (..., T)
        t, k = rate.shape[-1], self.kernel().to(rate.dtype)
        first = rate[..., :1].expand(*rate.shape[:-1], self.taps - 1)  # (..., taps − 1): the steady state before
        padded = torch.cat([first, rate], dim=-1)  # (..., T + taps − 1); step s of `rate` at s + taps − 1
        out = k[0] * rate
        for lag in range(1, self.taps):
            out = out + k[lag] * padded[..., self.taps - 1 - lag : self.taps - 1 - lag + t]  # rate(s − lag)
        return out  # (..., T)

    def extra_repr(self) -> str:
        return f"taps={self.taps}, offset={self.offset}"


class Exp(nn.Module):
    """``exp(x)``: ViV1T's output nonlinearity (``--output_mode=1`` in its README command; docs/models.md: ViV1T)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.exp(x)


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch for a random subset of samples, scale the rest by ``1/keep``.

    One copy for every architecture (DwiseNeuro, Dynamic-V1FM and ViV1T each carried their own). Port of timm's
    ``DropPath``: https://github.com/huggingface/pytorch-image-models/blob/main/timm/layers/drop.py

    Args:
        drop_prob: probability of dropping the branch of a sample (0: identity).
        scale_by_keep: divide kept samples by ``1 - drop_prob`` so the expectation is unchanged.
    """

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)  # (B, 1, ..., 1): one draw per sample
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * (mask / keep if self.scale_by_keep else mask)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def behavior_as_channels(video: Tensor, behavior: Tensor | None, pupil_center: Tensor | None = None) -> Tensor:
    """Append per-frame signals to the video as constant image channels, after the video channels.

    ``video (B, C, T, H, W)``, ``behavior (B, 2, T)``, ``pupil_center (B, 2, T)`` → ``(B, C + 2 [+ 2], T, H, W)``.
    Signals passed as None are left out. Same order and values as neuralpredictors' ``AddBehaviorAsChannels``:
    https://github.com/sinzlab/neuralpredictors/blob/main/neuralpredictors/data/transforms.py

    The cores call it, not the data loader: the batch always carries a 1-channel video plus the raw signals, and each
    core decides what enters as channels (the baselines: behaviour only; DwiseNeuro and ViV1T: behaviour and pupil
    centre).
    """
    signals = [s for s in (behavior, pupil_center) if s is not None]
    if not signals:
        return video
    b, _, t, h, w = video.shape
    maps = torch.cat(signals, dim=1).to(video.dtype)  # (B, S, T)
    maps = maps[..., None, None].expand(b, -1, t, h, w)  # (B, S, T, H, W), a view: no copy before the cat
    return torch.cat([video, maps], dim=1)  # (B, C + S, T, H, W)


def constant_maps_footprint(
    weight: Tensor, height: int, width: int, padding: tuple[int, int], stride: tuple[int, int] = (1, 1)
) -> Tensor:
    """Output of a 2D convolution with ``weight (O, S, kh, kw)`` on ``S`` separate unit maps of ``height × width``.

    Returns ``(S, O, H', W')``: entry ``[s, o]`` is the convolution of filter ``w[o, s]`` with an all-ones image, i.e.
    the filter's sum away from the border and a partial sum within ``padding`` of it. A convolution over
    ``[video, constant signal maps]`` (:func:`behavior_as_channels`) then equals the convolution of the video alone
    plus ``Σ_s signal_s · footprint[s]`` — for an 11×11 first layer of 1 video + 2 behaviour channels, a third of the
    multiply-adds (``benchmarks/bench_factorized_forward.py``). ``padding`` and ``stride`` are the convolution's.
    """
    o, s, kh, kw = weight.shape
    ones = weight.new_ones(1, s, height, width)
    per_signal = weight.transpose(0, 1).reshape(s * o, 1, kh, kw)  # (S·O, 1, kh, kw): filter w[o, s] at s·O + o
    out = F.conv2d(ones, per_signal, stride=stride, padding=padding, groups=s)  # (1, S·O, H', W')
    return out.view(s, o, out.shape[-2], out.shape[-1])  # (S, O, H', W')


def strided_spatial_conv(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int) -> Tensor:
    """``F.conv3d(x, weight, bias, (1, stride, stride), (0, padding, padding))`` for a ``(1, k, k)`` kernel, computed
    as a stride-1 convolution of the space-to-depth rearranged input.

    Each ``stride × stride`` block of pixels becomes ``stride²`` channels and the kernel, zero-padded to a multiple of
    the stride, is rearranged the same way: the same products and sums (up to float rounding). oneDNN's strided
    kernels are slow for one input channel — 0.142 against 0.059 s forward + backward for the factorized core's
    11 × 11, stride-2 first layer on a (8, 1, 40, 36, 64) batch on 2 CPU cores (``benchmarks/bench_strided_conv.py``,
    BENCHMARKS.md). Idea: the space-to-depth stem of TResNet, https://arxiv.org/abs/2003.13630.
    """
    b, c, t, h, w = x.shape
    o, _, kt, k, k2 = weight.shape
    if kt != 1 or k != k2:
        raise ValueError(f"strided_spatial_conv needs a square (1, k, k) kernel, got {tuple(weight.shape[2:])}")
    s = stride
    ho, wo = (h + 2 * padding - k) // s + 1, (w + 2 * padding - k) // s + 1
    kk = -(-k // s) * s  # kernel padded to a multiple of the stride
    hn, wn = s * (ho - 1) + kk, s * (wo - 1) + kk  # input rows/columns the outputs read, incl. the zero taps
    xp = F.pad(x, (padding, max(wn - w - padding, 0), padding, max(hn - h - padding, 0)))[..., :hn, :wn]
    # (B, C, T, hn, wn) → (B, C, T, hn/s, s, wn/s, s) → (B, C·s·s, T, hn/s, wn/s): channel c·s² + row phase·s + col
    xs = (
        xp.reshape(b, c, t, hn // s, s, wn // s, s)
        .permute(0, 1, 4, 6, 2, 3, 5)
        .reshape(b, c * s * s, t, hn // s, wn // s)
    )
    # (O, C, 1, kk, kk) → (O, C, kk/s, s, kk/s, s) → (O, C·s·s, 1, kk/s, kk/s), in the same channel order
    wp = F.pad(weight[:, :, 0], (0, kk - k, 0, kk - k)).reshape(o, c, kk // s, s, kk // s, s)
    ws = wp.permute(0, 1, 3, 5, 2, 4).reshape(o, c * s * s, 1, kk // s, kk // s)
    return F.conv3d(xs, ws, bias)  # (B, O, T, H', W')


# neuralpredictors regularizers.py `laplace()` and `laplace1d()`. The 1D filter sums to 2: it is not a second
# difference, and it penalises the filter's energy as well as its roughness (docs/models.md: Factorized baseline).
# Kept as the original. Built on the weight's device and dtype: no host-to-device copy per training step.
def _laplace_2d(like: Tensor) -> Tensor:
    """``[[0, -1, 0], [-1, 4, -1], [0, -1, 0]]`` (3, 3)."""
    k = like.new_zeros(3, 3)
    k[1, :] = -1.0
    k[:, 1] = -1.0
    k[1, 1] = 4.0
    return k


def _laplace_1d(like: Tensor) -> Tensor:
    """``[-1, 4, -1]`` (3,)."""
    k = like.new_full((3,), -1.0)
    k[1] = 4.0
    return k


def laplace_l2norm(weight: Tensor) -> Tensor:
    """Normalised Laplace smoothness of 2D filters ``(O, I, kh, kw)``: ``Σ (L ∗ w)² / Σ w²``.

    ``L`` is the 3×3 Laplace filter, applied with zero padding 1 (the original's ``padding=None`` → ``3 // 2``);
    sums run over all ``O·I`` filters (``avg=False``). Port of ``LaplaceL2norm``:
    https://github.com/sinzlab/neuralpredictors/blob/main/neuralpredictors/regularizers.py
    """
    o, i, kh, kw = weight.shape
    w = weight.reshape(o * i, 1, kh, kw)  # (O·I, 1, kh, kw)
    lap = F.conv2d(w, _laplace_2d(w)[None, None], padding=1)  # (O·I, 1, kh, kw)
    return lap.pow(2).sum() / w.pow(2).sum()


def depth_laplace_l21d(weight: Tensor) -> Tensor:
    """Normalised 1D Laplace smoothness of temporal filters ``(O, I, t)``: ``Σ ([-1, 4, -1] ∗ w)² / Σ w²``.

    Zero padding 1, sums over all ``O·I`` filters (``avg=False``). Port of ``DepthLaplaceL21d``:
    https://github.com/sinzlab/neuralpredictors/blob/main/neuralpredictors/regularizers.py
    """
    o, i, t = weight.shape
    w = weight.reshape(o * i, 1, t)  # (O·I, 1, t)
    lap = F.conv1d(w, _laplace_1d(w)[None, None], padding=1)  # (O·I, 1, t)
    return lap.pow(2).sum() / w.pow(2).sum()


__all__ = [
    "ELU1",
    "CalciumELU1",
    "DropPath",
    "Exp",
    "behavior_as_channels",
    "constant_maps_footprint",
    "depth_laplace_l21d",
    "laplace_l2norm",
    "strided_spatial_conv",
]
