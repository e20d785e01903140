"""Ground-truth neurons of the synthetic digital-twin mice.

A known generator of responses (Gabor feature bank, retinotopic receptive fields moved by gaze, simple / complex /
motion-energy cells, divisive normalisation, behaviour gain, calcium-like observation), so a model can be scored
against the noiseless rates, the best any model can predict. The model step by step, with its formulas and
references: docs/data.md, "Synthetic digital-twin mice (`synth`)".
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

#: Frame size of the release.
HEIGHT, WIDTH = 36, 64
#: Half-resolution grid of the feature bank.
FEAT_H, FEAT_W = HEIGHT // 2, WIDTH // 2
#: The model runs at 15 Hz: one step every 2 frames of 30 Hz.
FRAMES_PER_STEP = 2
ORIENTATIONS = 4
WAVELENGTHS = (5.0, 9.0)  # half-resolution pixels
TEMPORAL_KERNELS = ("sustained", "transient")
#: Quadrature pairs of the bank, ordered (temporal kernel, orientation, wavelength).
CHANNELS = len(TEMPORAL_KERNELS) * ORIENTATIONS * len(WAVELENGTHS)
#: The transient kernel is the sustained one minus itself this many steps (133 ms) later: biphasic, zero DC, and
#: obtained from the sustained bank by one subtraction (spatial filtering is linear and time-invariant).
TRANSIENT_LAG = 2
#: Delay of the motion-energy term, in model steps (67 ms).
DELAY_STEPS = 1
#: Normalisation pool: Gaussian σ in half-resolution pixels.
POOL_SIGMA = 6.0
#: Calcium decay time constant (frames at 30 Hz) and the two-photon scan rate.
CALCIUM_TAU = 9.0
SCAN_HZ = 8.0
FPS = 30.0
#: Grey-level statistics the movies are z-scored with (the release's train statistics).
VIDEO_MEAN, VIDEO_STD = 80.0, 55.0


# ------------------------------------------------------------------------------------------------- filters
def _band_matrix(kernel: np.ndarray, n: int) -> np.ndarray:
    """``(n, n)`` matrix M with ``(M @ v)[i] = Σ_j kernel[j − i + r] v[j]`` (correlation, zero padding)."""
    r = len(kernel) // 2
    m = np.zeros((n, n), dtype=kernel.dtype)
    for i in range(n):
        lo, hi = max(0, i - r), min(n, i + r + 1)
        m[i, lo:hi] = kernel[lo - i + r : hi - i + r]
    return m


@functools.lru_cache(maxsize=1)
def _gabor_matrices() -> tuple[torch.Tensor, torch.Tensor]:
    """Separable complex Gabors as band matrices: rows ``(W, F·W·2)`` real (re, im interleaved), columns ``(F, H, H)``.

    A Gabor with a circular Gaussian envelope is the product of two 1-D complex Gabors,
    ``g(x, y) = [G_σ(x) e^{i k cosθ x}] · [G_σ(y) e^{i k sinθ y}]``; its real part is the even filter, its
    imaginary part the odd one. Filters are ordered (orientation, wavelength); each 1-D Gaussian sums to 1, so a
    matched grating of unit amplitude gives a response of modulus ≈ 1.
    """
    rows, cols = [], []
    for o in range(ORIENTATIONS):
        theta = math.pi * o / ORIENTATIONS
        for lam in WAVELENGTHS:
            sigma, k = 0.45 * lam, 2 * math.pi / lam
            r = int(math.ceil(2.5 * sigma))
            d = np.arange(-r, r + 1, dtype=np.float64)
            env = np.exp(-(d**2) / (2 * sigma**2))
            env /= env.sum()
            rows.append(_band_matrix(env * np.exp(1j * k * math.cos(theta) * d), FEAT_W))
            cols.append(_band_matrix(env * np.exp(1j * k * math.sin(theta) * d), FEAT_H))
    row = np.stack([m.T for m in rows], axis=1)  # (W_in, F, W_out) complex
    row = np.stack([row.real, row.imag], axis=-1).reshape(FEAT_W, -1)  # (W_in, F·W_out·[re, im])
    return torch.tensor(row, dtype=torch.float32), torch.tensor(np.stack(cols), dtype=torch.complex64)


def _sustained_kernel() -> np.ndarray:
    """Causal monophasic kernel ``(12,)`` at 30 Hz (index = lag in frames), peaking at 3 frames (100 ms), sum 1."""
    t = np.arange(12, dtype=np.float64)
    k = (t / 3.0) ** 2 * np.exp(-t / 1.5)
    return k / k.sum()


@functools.lru_cache(maxsize=8)
def _temporal_matrix(frames: int) -> torch.Tensor:
    """``(S, frames)``: the sustained kernel evaluated at the last frame of every 15 Hz step (zeros before 0)."""
    kernel = _sustained_kernel()
    steps = -(-frames // FRAMES_PER_STEP)
    m = np.zeros((steps, frames))
    for s in range(steps):
        f = min(FRAMES_PER_STEP * s + FRAMES_PER_STEP - 1, frames - 1)
        lags = f - np.arange(frames)
        ok = (lags >= 0) & (lags < len(kernel))
        m[s, ok] = kernel[lags[ok]]
    return torch.tensor(m, dtype=torch.float32)


@functools.lru_cache(maxsize=1)
def _pool_matrices() -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blur band matrices ``(H, H)`` and ``(W, W)``, rows renormalised at the borders."""
    r = int(3 * POOL_SIGMA)
    d = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-(d**2) / (2 * POOL_SIGMA**2))
    mh, mw = _band_matrix(g, FEAT_H), _band_matrix(g, FEAT_W)
    mh /= mh.sum(1, keepdims=True)
    mw /= mw.sum(1, keepdims=True)
    return torch.tensor(mh, dtype=torch.float32), torch.tensor(mw, dtype=torch.float32)


@dataclass(frozen=True)
class FeatureBank:
    """Per-clip feature maps the neurons read from (time last so one neuron's samples are close in memory).

    Attributes:
        quadrature: ``(CHANNELS, FEAT_H, FEAT_W, S)`` complex64 ``even + i·odd`` responses at S 15 Hz steps.
        pool: ``(FEAT_H, FEAT_W, S)`` float32 normalisation pool (root of the blurred contrast energy).
    """

    quadrature: np.ndarray
    pool: np.ndarray

    @property
    def steps(self) -> int:
        return self.pool.shape[-1]


@torch.no_grad()
def feature_bank(video: np.ndarray) -> FeatureBank:
    """Feature maps of one clip ``(T, HEIGHT, WIDTH)`` in grey levels (NaN-free)."""
    t = video.shape[0]
    h, w = FEAT_H, FEAT_W
    x = torch.from_numpy(np.ascontiguousarray(video, dtype=np.float32)).view(t * h, 2, w, 2)
    x = x[:, 0, :, 0] + x[:, 0, :, 1] + x[:, 1, :, 0] + x[:, 1, :, 1]  # (T·h, w): 2×2 block sums
    x = x * (0.25 / VIDEO_STD) - VIDEO_MEAN / VIDEO_STD  # z-scored half-resolution movie
    xt = _temporal_matrix(t) @ x.reshape(t, h * w)  # (S, h·w): sustained response at 15 Hz
    steps = xt.shape[0]
    rows, cols = _gabor_matrices()
    f = cols.shape[0]
    y = torch.view_as_complex((xt.reshape(steps * h, w) @ rows).reshape(steps * h, f, w, 2))  # along x
    y = y.reshape(steps, h, f, w).permute(2, 1, 0, 3).reshape(f, h, steps * w)  # (F, h_in, S·w)
    z = torch.bmm(cols, y).reshape(f, h, steps, w).permute(0, 1, 3, 2)  # (F, h, w, S): along y, even + i·odd
    quadrature = torch.empty((len(TEMPORAL_KERNELS), f, h, w, steps), dtype=torch.complex64)
    sustained, transient = quadrature[0], quadrature[1]
    sustained.copy_(z)
    # Transient kernel = sustained minus itself TRANSIENT_LAG later (before the trial the grey screen gave 0).
    lag = TRANSIENT_LAG
    transient[..., :lag] = sustained[..., :lag]
    torch.sub(sustained[..., lag:], sustained[..., :-lag], out=transient[..., lag:])
    parts = torch.view_as_real(sustained).reshape(f, -1)  # (F, h·w·S·2)
    energy = (torch.ones(1, f) @ parts.square()).reshape(h, w, steps, 2).sum(-1) / f  # (h, w, S) mean |z|²
    mh, mw = _pool_matrices()
    local = torch.einsum("yh,hws->yws", mh, torch.einsum("xw,hws->hxs", mw, energy))
    pool = (0.5 * local + 0.5 * energy.mean(dim=(0, 1), keepdim=True)).sqrt()
    return FeatureBank(quadrature=quadrature.reshape(CHANNELS, h, w, steps).numpy(), pool=pool.contiguous().numpy())


# ------------------------------------------------------------------------------------------------- neurons
@dataclass
class NeuronParameters:
    """Ground-truth parameters of one mouse's neurons (arrays ``(N,)`` unless noted) and its behaviour references."""

    rf_center: np.ndarray  # (N, 2) x, y in half-resolution pixels
    channel: np.ndarray  # index into FeatureBank.quadrature (temporal kernel, orientation, wavelength)
    orientation: np.ndarray  # degrees (for documentation: implied by channel)
    wavelength: np.ndarray  # full-resolution pixels (implied by channel)
    transient: np.ndarray  # bool (implied by channel)
    phase: np.ndarray  # radians, of the simple part
    simple_index: np.ndarray  # a ∈ [0, 1]
    direction_index: np.ndarray  # b ∈ [0, 1]
    direction_sign: np.ndarray  # δ = ±1
    norm_sigma: np.ndarray
    norm_weight: np.ndarray
    exponent: np.ndarray
    baseline: np.ndarray  # fraction β of the mean rate that is stimulus independent
    target_mean: np.ndarray  # μ
    run_weight: np.ndarray
    pupil_weight: np.ndarray
    noise_amplitude: np.ndarray  # mean size of one calcium event (the noise level)
    drive_mean: np.ndarray  # m, set by `calibrate`
    eye_reference: np.ndarray  # (2,) resting pupil centre, camera px
    pupil_reference: np.ndarray  # (2,) mean and std of the mouse's pupil size
    gaze_gain: np.ndarray  # () half-resolution px of RF shift per camera px of pupil centre

    def as_arrays(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in asdict(self).items()}


def retinotopy(rng: np.random.Generator, coordinates: np.ndarray) -> np.ndarray:
    """RF centres ``(N, 2)`` (half-resolution px) from cortical ``coordinates (N, 3)``: smooth map plus scatter."""
    xy = coordinates[:, :2].astype(np.float64)
    xy = (xy - xy.mean(0)) / (np.abs(xy - xy.mean(0)).max() + 1e-9)  # (N, 2) in [-1, 1], isotropic
    angle = rng.uniform(0, 2 * math.pi)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    u = xy @ rot.T * rng.uniform([0.55, 0.6], [0.7, 0.8])
    phase = rng.uniform(0, 2 * math.pi, size=2)
    u = u + 0.06 * np.sin(2.2 * u[:, ::-1] + phase)  # gentle non-linear warp of the map
    u = u + rng.uniform(-0.15, 0.15, size=2) + rng.normal(0, 0.04, size=u.shape)  # offset, scatter
    u = np.clip(u, -0.95, 0.95)
    return np.stack([(u[:, 0] + 1) / 2 * (FEAT_W - 1), (u[:, 1] + 1) / 2 * (FEAT_H - 1)], axis=1)


def draw_neurons(
    rng: np.random.Generator, coordinates: np.ndarray, eye_reference: np.ndarray, pupil_reference: np.ndarray
) -> NeuronParameters:
    """Draw the neurons of one mouse; ``drive_mean`` is 1 until :func:`calibrate`."""
    n = int(coordinates.shape[0])
    kernel = (rng.random(n) < 0.4).astype(np.int64)  # 40 % transient
    orientation = rng.integers(0, ORIENTATIONS, size=n)
    wave = rng.integers(0, len(WAVELENGTHS), size=n)
    channel = (kernel * ORIENTATIONS + orientation) * len(WAVELENGTHS) + wave
    return NeuronParameters(
        rf_center=retinotopy(rng, coordinates),
        channel=channel,
        orientation=180.0 * orientation / ORIENTATIONS,
        wavelength=2.0 * np.asarray(WAVELENGTHS)[wave],
        transient=kernel.astype(bool),
        phase=rng.uniform(0, 2 * math.pi, size=n),
        simple_index=rng.beta(0.6, 0.6, size=n),
        direction_index=rng.beta(0.6, 1.2, size=n),
        direction_sign=rng.choice([-1.0, 1.0], size=n),
        norm_sigma=rng.lognormal(math.log(0.25), 0.4, size=n),
        norm_weight=rng.uniform(0.5, 1.5, size=n),
        exponent=rng.uniform(1.3, 2.2, size=n),
        baseline=rng.uniform(0.02, 0.15, size=n),
        target_mean=np.clip(rng.lognormal(math.log(1.3), 0.6, size=n), 0.2, 12.0),
        run_weight=rng.normal(0.3, 0.2, size=n),
        pupil_weight=rng.normal(0.1, 0.15, size=n),
        noise_amplitude=rng.lognormal(math.log(11.0), 0.35, size=n),
        drive_mean=np.ones(n),
        eye_reference=np.asarray(eye_reference, dtype=np.float64),
        pupil_reference=np.asarray(pupil_reference, dtype=np.float64),
        gaze_gain=np.asarray(rng.uniform(0.25, 0.35)),
    )


def _bilinear_indices(pos: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower corner (int) and weight of the upper corner for positions ``pos`` on a grid of ``size``."""
    pos = np.clip(pos, 0.0, size - 1.0)
    lo = np.minimum(pos.astype(np.int64), size - 2)
    return lo, (pos - lo).astype(np.float32)


#: Neurons per block in `stimulus_drive`: bounds its temporaries (~20 arrays of block × S) whatever N is.
NEURON_BLOCK = 2048


def stimulus_drive(bank: FeatureBank, params: NeuronParameters, gaze: np.ndarray) -> np.ndarray:
    """Normalised stimulus drive ``d`` ``(N, S)`` ≥ 0, RFs moved by ``gaze (S, 2)`` (x, y half-resolution px)."""
    n = len(params.channel)
    out = np.empty((n, bank.steps), dtype=np.float32)
    for lo in range(0, n, NEURON_BLOCK):
        out[lo : lo + NEURON_BLOCK] = _drive_block(bank, params, gaze, slice(lo, lo + NEURON_BLOCK))
    return out


def _drive_block(bank: FeatureBank, params: NeuronParameters, gaze: np.ndarray, block: slice) -> np.ndarray:
    """`stimulus_drive` for the neurons ``block``: bilinear samples of the bank at the moved RFs → drive."""
    c, h, w, s = bank.quadrature.shape
    center = params.rf_center[block]
    x0, fx = _bilinear_indices(center[:, :1] + gaze[None, :, 0], w)  # (n, S)
    y0, fy = _bilinear_indices(center[:, 1:] + gaze[None, :, 1], h)
    pix = (y0 * w + x0) * s + np.arange(s)[None, :]  # (n, S) flat index into (h, w, S)
    at = pix + (params.channel[block] * (h * w * s))[:, None]  # ... and into (C, h, w, S)
    quad, pool_map = bank.quadrature.reshape(-1), bank.pool.reshape(-1)
    right, down, diag, gx = s, w * s, (w + 1) * s, 1 - fx
    z = (quad[at] * gx + quad[at + right] * fx) * (1 - fy) + (quad[at + down] * gx + quad[at + diag] * fx) * fy
    pool = (pool_map[pix] * gx + pool_map[pix + right] * fx) * (1 - fy)
    pool += (pool_map[pix + down] * gx + pool_map[pix + diag] * fx) * fy
    # Adelson–Bergen motion energy ½|z(t) + iδ·z(t−1)|: the delayed signal is the one the RF saw one step ago.
    delayed = np.concatenate([z[:, :DELAY_STEPS], z[:, :-DELAY_STEPS]], axis=1)
    motion = 0.5 * np.abs(z + (1j * params.direction_sign[block, None]).astype(np.complex64) * delayed)
    linear = (z * np.exp(-1j * params.phase[block, None]).astype(np.complex64)).real  # cos φ·even + sin φ·odd
    a = params.simple_index[block, None].astype(np.float32)
    b = params.direction_index[block, None].astype(np.float32)
    drive = a * 2.0 * np.maximum(linear, 0.0) + (1 - a) * ((1 - b) * np.abs(z) + b * motion)
    return drive / (params.norm_sigma[block, None] + params.norm_weight[block, None] * pool)


def _steps_of(x: np.ndarray, length: int) -> np.ndarray:
    """Rows of ``x (T, ...)`` at the last frame of every 15 Hz step of a ``length``-frame trial."""
    frames = np.minimum(np.arange(-(-length // FRAMES_PER_STEP)) * FRAMES_PER_STEP + FRAMES_PER_STEP - 1, length - 1)
    return x[frames]


def gaze_shift(params: NeuronParameters, pupil_center: np.ndarray) -> np.ndarray:
    """RF shift ``(S, 2)`` in half-resolution px from the pupil centre ``(T, 2)`` of a trial."""
    return float(params.gaze_gain) * (_steps_of(pupil_center, len(pupil_center)) - params.eye_reference)


def behaviour_gain(params: NeuronParameters, behavior: np.ndarray) -> np.ndarray:
    """Multiplicative gain ``(N, S)`` from ``behavior (T, 2)`` = [pupil size, running speed]."""
    b = _steps_of(behavior, len(behavior))
    running = np.clip(b[:, 1] / 10.0, 0.0, 2.5)
    pupil = (b[:, 0] - params.pupil_reference[0]) / params.pupil_reference[1]
    return np.exp(np.outer(params.run_weight, running) + np.outer(params.pupil_weight, pupil))


def calibrate(params: NeuronParameters, videos: list[np.ndarray]) -> None:
    """Set ``drive_mean`` = mean of ``d^p`` over natural ``videos`` seen with the eye at rest."""
    total, count = np.zeros(len(params.channel)), 0
    for video in videos:
        bank = feature_bank(video)
        d = stimulus_drive(bank, params, np.zeros((bank.steps, 2)))
        total += (d.astype(np.float64) ** params.exponent[:, None]).sum(1)
        count += bank.steps
    params.drive_mean = total / count + 1e-9


def step_rates(
    bank: FeatureBank, params: NeuronParameters, behavior: np.ndarray, pupil_center: np.ndarray
) -> np.ndarray:
    """Noiseless rate ``(N, S)`` at 15 Hz for one trial (``behavior``, ``pupil_center``: ``(T, 2)`` of the trial)."""
    d = stimulus_drive(bank, params, gaze_shift(params, pupil_center)).astype(np.float64)
    tuned = d ** params.exponent[:, None] / params.drive_mean[:, None]
    beta = params.baseline[:, None]
    return params.target_mean[:, None] * behaviour_gain(params, behavior) * (beta + (1 - beta) * tuned)


def _observation_matrices(length: int, phase: float) -> tuple[np.ndarray, np.ndarray]:
    """Calcium-and-scan matrix ``(S, K)`` (15 Hz rate → 8 Hz samples) and interpolation ``(K, length)`` to 30 Hz.

    The rate of step s holds over frames [2s + 1, 2s + 3) (it is known at frame 2s + 1); the calcium signal
    integrates it exactly with the kernel ``exp(−t/τ)/τ``, so a constant rate gives a constant signal.
    """
    steps = -(-length // FRAMES_PER_STEP)
    start = np.arange(steps, dtype=np.float64) * FRAMES_PER_STEP + FRAMES_PER_STEP - 1  # (S,)
    scan_t = np.arange(phase, length - 1 + 1e-9, FPS / SCAN_HZ)  # (K,) frame times of the 8 Hz samples
    lag_start = scan_t[None, :] - start[:, None]  # (S, K)
    lag_end = np.maximum(lag_start - FRAMES_PER_STEP, 0.0)
    calcium = np.where(lag_start > 0, np.exp(-lag_end / CALCIUM_TAU) - np.exp(-lag_start / CALCIUM_TAU), 0.0)
    # Before the trial the cell sat at its first-step rate (steady state), not at zero.
    calcium[0] += np.exp(-np.maximum(lag_start[0], 0.0) / CALCIUM_TAU)
    frames = np.arange(length, dtype=np.float64)
    k = np.clip(np.searchsorted(scan_t, frames, side="right") - 1, 0, len(scan_t) - 1)
    k1 = np.minimum(k + 1, len(scan_t) - 1)
    span = np.where(k1 > k, scan_t[k1] - scan_t[k], 1.0)
    w1 = np.clip((frames - scan_t[k]) / span, 0.0, 1.0)
    interp = np.zeros((len(scan_t), length))
    np.add.at(interp, (k, np.arange(length)), 1 - w1)
    np.add.at(interp, (k1, np.arange(length)), w1)
    return calcium, interp


def observe(
    rate: np.ndarray, params: NeuronParameters, length: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``(rates, responses)`` ``(N, length)`` float32 at 30 Hz from the 15 Hz ``rate (N, S)``.

    Calcium kernel → 8 Hz samples (random scan phase) → compound-Poisson noise with the sample as its mean →
    linear interpolation to 30 Hz. ``rates`` skips the noise step.
    """
    calcium, interp = _observation_matrices(length, float(rng.uniform(0, FPS / SCAN_HZ)))
    samples = (torch.from_numpy(rate) @ torch.from_numpy(calcium)).numpy()  # (N, K); torch: obeys its thread setting
    amplitude = np.broadcast_to(params.noise_amplitude[:, None], samples.shape)
    counts = rng.poisson(np.maximum(samples, 0.0) / amplitude)
    noisy = np.zeros_like(samples)
    events = counts > 0
    # Sum of `counts` gamma(2, A/2) event sizes = gamma(2·counts, A/2): mean counts·A, the sample on average.
    noisy[events] = rng.gamma(2.0 * counts[events], amplitude[events] / 2.0)
    up = torch.from_numpy(interp.astype(np.float32))  # (K, length)
    both = torch.from_numpy(np.concatenate([samples, noisy]).astype(np.float32)) @ up  # (2N, length)
    return both[: len(samples)].numpy(), both[len(samples) :].numpy()
