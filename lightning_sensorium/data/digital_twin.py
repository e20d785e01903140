"""Ground-truth neurons of the synthetic digital-twin mice.

The model, per mouse (all parameters drawn from the mouse's seed):

1. **Feature bank** (shared by all neurons, computed once per unique clip at half resolution, 18×32): quadrature
   Gabor pairs at 4 orientations × 2 spatial frequencies, each filtered in time by a *sustained* and a
   *transient* causal kernel with a 2–4 frame latency (30 Hz). From these: linear (simple-cell) maps, energy
   (complex-cell) maps ``even² + odd²``, and Adelson–Bergen motion energies ``(even(t) ± odd(t−2))²`` for the two
   directions of motion orthogonal to each orientation (direction selectivity).
2. **Receptive fields**: each neuron reads one channel of the bank at its RF centre, laid out retinotopically
   (a smooth, rotated, slightly jittered map from cortical x, y to the visual field) — so a Gaussian readout
   driven by cortical coordinates can find it. Cell types: 40 % simple (half-wave rectified linear, either
   sign), 40 % complex (√energy), 20 % direction-selective (√motion energy).
3. **Gaze**: every RF centre moves with the pupil centre, frame by frame (``gaze_gain`` normalised units per px).
4. **Divisive normalisation**: the drive is divided by ``σ + w·P`` where ``P`` is the total contrast energy
   blurred over a large neighbourhood (σ ≈ ¼ of the frame), so context far outside the RF matters.
5. **Behavioural gain**: multiplicative ``exp(a·running + b·pupil)`` with per-neuron weights.
6. **Calcium-like output**: rate → causal exponential kernel (τ ≈ 0.3 s) → sampled at 8 Hz → trial-to-trial
   noise → linear upsampling to 30 Hz. The noise is a compound Poisson process (spike counts × gamma amplitudes)
   whose mean equals the noiseless rate, so the recorded traces are sparse and heavy-tailed (median ≈ 0) like
   deconvolved activity. The *noiseless rates* are the same pipeline without the noise: the best any model can
   do, which is what the ground-truth oracle correlation measures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

#: Frame size of the release.
HEIGHT, WIDTH = 36, 64
#: Half-resolution grid on which the feature bank lives.
FEAT_H, FEAT_W = 18, 32
ORIENTATIONS = 4
WAVELENGTHS = (5.0, 9.0)  # pixels at half resolution
CELL_TYPES = ("simple", "complex", "direction")


def _gabor_bank() -> torch.Tensor:
    """Quadrature Gabor filters ``(ORIENTATIONS · len(WAVELENGTHS) · 2, 1, 11, 11)``: [even, odd] per pair."""
    size = 11
    y, x = np.mgrid[-(size // 2) : size // 2 + 1, -(size // 2) : size // 2 + 1].astype(np.float64)
    filters = []
    for k in range(ORIENTATIONS):
        theta = math.pi * k / ORIENTATIONS
        xr = x * math.cos(theta) + y * math.sin(theta)
        for lam in WAVELENGTHS:
            env = np.exp(-(x**2 + y**2) / (2 * (0.45 * lam) ** 2))
            for phase in (0.0, math.pi / 2):
                g = env * np.cos(2 * math.pi * xr / lam + phase)
                g -= g.mean() * env / env.mean() if phase == 0.0 else 0.0
                filters.append(g / np.abs(g).sum())
    return torch.tensor(np.stack(filters)[:, None], dtype=torch.float32)


def _temporal_kernels() -> torch.Tensor:
    """Causal sustained and transient kernels ``(2, 12)``, newest frame last (for conv1d)."""
    t = np.arange(12, dtype=np.float64)
    sustained = (t / 3.0) ** 2 * np.exp(-t / 1.5)
    transient = sustained - 0.8 * (t / 5.0) ** 2 * np.exp(-t / 2.5)
    kernels = np.stack([sustained / np.abs(sustained).sum(), transient / np.abs(transient).sum()])
    return torch.tensor(kernels[:, ::-1].copy(), dtype=torch.float32)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(T, C, H, W)`` with replicate padding."""
    radius = max(1, int(3 * sigma))
    k = torch.exp(-(torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, 0, 0), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.pad(x, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


@dataclass
class FeatureBank:
    """Per-clip feature maps the neurons read from.

    Attributes:
        channels: ``(T, C, FEAT_H, FEAT_W)`` drive maps (linear, energy and motion-energy channels).
        pool: ``(T, 1, FEAT_H, FEAT_W)`` normalisation pool (blurred total energy).
    """

    channels: torch.Tensor
    pool: torch.Tensor


#: Number of channels of a FeatureBank: per (orientation, wavelength, temporal kernel): even, odd, energy,
#: and two motion energies (sustained kernel only carries direction; the transient one repeats them).
N_PAIRS = ORIENTATIONS * len(WAVELENGTHS) * 2  # × 2 temporal kernels
CHANNELS_PER_PAIR = 5


def feature_bank(video: np.ndarray) -> FeatureBank:
    """Feature maps of one clip ``(T, HEIGHT, WIDTH)`` in grey levels (NaN-free)."""
    x = torch.from_numpy(((video - 80.0) / 55.0).astype(np.float32))[:, None]  # (T, 1, 36, 64)
    x = F.interpolate(x, size=(FEAT_H, FEAT_W), mode="area")  # (T, 1, 18, 32)
    t, _, h, w = x.shape
    # Space and time filtering commute (both linear): filter pixels in time first, it is far cheaper.
    seq = x.reshape(t, h * w).T[:, None]  # (H·W, 1, T)
    seq = F.conv1d(F.pad(seq, (11, 0)), _temporal_kernels()[:, None])  # (H·W, 2 kernels, T)
    frames = seq.permute(1, 2, 0).reshape(2 * t, 1, h, w)  # (2·T, 1, H, W)
    lin = F.conv2d(frames, _gabor_bank(), padding=5)  # (2·T, 2·P, H, W), P quadrature pairs
    lin = lin.reshape(2, t, -1, 2, h, w).transpose(0, 1)  # (T, 2 kernels, P, [even, odd], H, W)
    even, odd = lin[:, :, :, 0], lin[:, :, :, 1]  # (T, 2, P, H, W)
    odd_delayed = torch.cat([odd[:1].expand(2, -1, -1, -1, -1), odd[:-2]], dim=0)  # odd(t - 2)
    stacked = torch.empty((*even.shape[:3], CHANNELS_PER_PAIR, h, w))  # (T, 2, P, 5, H, W)
    stacked[:, :, :, 0], stacked[:, :, :, 1] = even, odd
    torch.hypot(even, odd, out=stacked[:, :, :, 2])  # √energy
    torch.abs(even + odd_delayed, out=stacked[:, :, :, 3])  # √ forward motion energy
    torch.abs(even - odd_delayed, out=stacked[:, :, :, 4])  # √ backward motion energy
    channels = stacked.reshape(t, -1, h, w)  # (T, 2·P·5, H, W)
    energy = stacked[:, :, :, 2].square().sum(dim=(1, 2))[:, None]  # (T, 1, H, W)
    pool = _gaussian_blur(energy, 5.0)  # (T, 1, H, W)
    return FeatureBank(channels=channels, pool=pool)


@dataclass
class NeuronParameters:
    """Ground-truth parameters of one mouse's neurons (all arrays ``(N, ...)``)."""

    rf_center: Any  # (N, 2) normalised [-1, 1] (x, y)
    channel: Any  # (N,) index into FeatureBank.channels
    cell_type: Any  # (N,) index into CELL_TYPES
    sign: Any  # (N,) ±1 for simple cells
    norm_weight: Any  # (N,)
    run_gain: Any  # (N,)
    pupil_gain: Any  # (N,)
    baseline: Any  # (N,)
    scale: Any  # (N,) set by calibration so the mean rate is `target_mean`
    target_mean: Any  # (N,)
    gaze_gain: float = 0.02  # normalised units per pupil-centre pixel

    def as_arrays(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in self.__dict__.items()}


def draw_neurons(rng: np.random.Generator, coordinates: np.ndarray) -> NeuronParameters:
    """Draw neuron parameters; RF centres follow cortical ``coordinates`` (N, 3) retinotopically."""
    n = coordinates.shape[0]
    xy = coordinates[:, :2].astype(np.float64)
    xy = (xy - xy.mean(0)) / (np.abs(xy - xy.mean(0)).max(0) + 1e-9)  # [-1, 1]
    angle = rng.uniform(0, 2 * math.pi)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    centers = 0.7 * xy @ rot.T + rng.normal(0, 0.04, size=(n, 2))
    cell_type = rng.choice(3, size=n, p=[0.4, 0.4, 0.2])
    pair = rng.integers(0, N_PAIRS, size=n)  # (kernel, orientation·wavelength) pair
    # Channel layout: ((kernel · P + pair_in_kernel) · 5 + component)
    phase = rng.integers(0, 2, size=n)  # even / odd for simple cells
    direction = 3 + rng.integers(0, 2, size=n)  # forward / backward motion energy
    component = np.where(cell_type == 0, phase, np.where(cell_type == 1, 2, direction))
    return NeuronParameters(
        rf_center=np.clip(centers, -0.9, 0.9),
        channel=pair * CHANNELS_PER_PAIR + component,
        cell_type=cell_type,
        sign=rng.choice([-1.0, 1.0], size=n),
        norm_weight=rng.uniform(0.5, 2.0, size=n),
        run_gain=rng.normal(0.25, 0.15, size=n),
        pupil_gain=rng.normal(0.1, 0.1, size=n),
        baseline=rng.uniform(0.02, 0.1, size=n),
        scale=np.ones(n),
        target_mean=rng.lognormal(math.log(1.5), 0.5, size=n),
    )


def _bilinear(maps: torch.Tensor, channel: torch.Tensor, grid: np.ndarray) -> np.ndarray:
    """Sample ``maps (T, C, H, W)`` at ``grid (T, N, 2)`` (normalised x, y; align_corners) in channel ``channel (N,)``.

    Gathers only each neuron's own channel: O(T·N), not O(T·C·N) as ``grid_sample`` would be.
    """
    t, c, h, w = maps.shape
    px = np.clip((grid[..., 0] + 1) / 2 * (w - 1), 0, w - 1)  # (T, N)
    py = np.clip((grid[..., 1] + 1) / 2 * (h - 1), 0, h - 1)
    x0, y0 = np.minimum(px.astype(np.int64), w - 2), np.minimum(py.astype(np.int64), h - 2)
    fx, fy = torch.from_numpy(px - x0).float(), torch.from_numpy(py - y0).float()
    flat = maps.reshape(t, c * h * w)  # (T, C·H·W)
    base = channel.numpy()[None] * h * w  # (1, N)

    def at(yy: np.ndarray, xx: np.ndarray) -> torch.Tensor:
        return flat.gather(1, torch.from_numpy(base + yy * w + xx))  # (T, N)

    top = at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx
    bottom = at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx
    return (top * (1 - fy) + bottom * fy).numpy().astype(np.float64)


def drive(bank: FeatureBank, params: NeuronParameters, pupil_center: np.ndarray) -> np.ndarray:
    """Stimulus drive ``(T, N)`` (before gain and calcium) with RFs moved by the gaze ``pupil_center (T, 2)``."""
    shift = params.gaze_gain * (pupil_center - np.nanmean(pupil_center, axis=0, keepdims=True))  # (T, 2)
    grid = params.rf_center[None, :, :] + np.nan_to_num(shift)[:, None, :]  # (T, N, 2)
    values = _bilinear(bank.channels, torch.from_numpy(params.channel).long(), grid)  # (T, N)
    pooled = _bilinear(bank.pool, torch.zeros(len(params.channel), dtype=torch.long), grid)  # (T, N)
    simple = params.cell_type == 0
    values[:, simple] = np.maximum(values[:, simple] * params.sign[simple], 0.0)
    return values / (0.05 + params.norm_weight * pooled)


def behaviour_gain(params: NeuronParameters, behavior: np.ndarray) -> np.ndarray:
    """Multiplicative gain ``(T, N)`` from ``behavior (T, 2)`` = [pupil size, running speed]."""
    running = np.clip((behavior[:, 1] - 3.0) / 6.0, -0.5, 2.5)
    pupil = (behavior[:, 0] - 45.0) / 12.0
    return np.exp(np.outer(running, params.run_gain) + np.outer(pupil, params.pupil_gain))


def calcium(rate: np.ndarray) -> np.ndarray:
    """Causal exponential calcium kernel (τ = 9 frames ≈ 0.3 s) along time of ``(T, N)``."""
    out = np.empty_like(rate)
    acc = np.zeros(rate.shape[1])
    decay = math.exp(-1.0 / 9.0)
    for i in range(rate.shape[0]):
        acc = decay * acc + (1 - decay) * rate[i]
        out[i] = acc
    return out


def sample_8hz_upsample(trace: np.ndarray, rng: np.random.Generator | None, kappa: float = 1.5) -> np.ndarray:
    """Sample ``(T, N)`` at 8 Hz, add compound-Poisson noise (mean preserving) if ``rng``, upsample to 30 Hz."""
    t = trace.shape[0]
    sample_frames = np.arange(0, t, 30.0 / 8.0)  # 8 Hz sample times in 30 Hz frames
    lo = np.floor(sample_frames).astype(int)
    hi = np.minimum(lo + 1, t - 1)
    frac = (sample_frames - lo)[:, None]
    samples = (1 - frac) * trace[lo] + frac * trace[hi]  # (K, N)
    if rng is not None:
        counts = rng.poisson(np.maximum(samples, 0) * kappa)
        amplitude = rng.gamma(shape=2.0, scale=0.5, size=counts.shape)  # mean 1
        samples = np.where(counts > 0, counts * amplitude / kappa, 0.0)
    return _interp_matrix(t, sample_frames) @ samples  # (T, K) @ (K, N) -> (T, N)


def _interp_matrix(t: int, sample_frames: np.ndarray) -> np.ndarray:
    """``(t, K)`` matrix of linear interpolation from samples at ``sample_frames`` to frames ``0..t-1``."""
    frames = np.arange(t, dtype=np.float64)
    k = np.clip(np.searchsorted(sample_frames, frames, side="right") - 1, 0, len(sample_frames) - 1)
    k1 = np.minimum(k + 1, len(sample_frames) - 1)
    span = np.where(k1 > k, sample_frames[k1] - sample_frames[k], 1.0)
    w1 = np.clip((frames - sample_frames[k]) / span, 0.0, 1.0)
    m = np.zeros((t, len(sample_frames)))
    m[np.arange(t), k] += 1 - w1
    m[np.arange(t), k1] += w1
    return m
