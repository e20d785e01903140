"""Generators of what synthetic mice see and do, at the release's frame size and rate.

Stimuli: natural-like movies (panning, zooming 1/f scenes with moving 1/f-textured objects and scene cuts every
40–120 frames) for the train / oracle / main tiers, and the five out-of-distribution families of the bonus tiers
with the real trial lengths. Behaviour: running in bouts, pupil size with slow dynamics coupled to running and
arousal, pupil centre with fixational drift and saccade-like jumps. Every generator draws from the ``rng`` it is
given, so a seed gives the same pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lightning_sensorium.data import digital_twin as twin

H, W = twin.HEIGHT, twin.WIDTH
#: Background grey of the OOD stimuli: the mean grey level of the natural movies.
GREY = 80.0


def _pink(rng: np.random.Generator, h: int, w: int, alpha: float = 1.0, orientation: float | None = None) -> np.ndarray:
    """Zero-mean, unit-std ``(h, w)`` image with a 1/f^alpha amplitude spectrum (optionally oriented)."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.hypot(fx, fy)
    f[0, 0] = 1.0
    amplitude = f**-alpha
    if orientation is not None:  # von Mises weighting of the wave-vector angle: oriented texture
        amplitude = amplitude * np.exp((np.cos(2 * (np.arctan2(fy, fx) - orientation)) - 1) / 0.5)
    spectrum = amplitude * (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape))
    spectrum[0, 0] = 0.0
    img = np.fft.irfft2(spectrum, s=(h, w))
    return (img - img.mean()) / (img.std() + 1e-9)


def _to_grey(z: np.ndarray, mean: float = 80.0, std: float = 55.0) -> np.ndarray:
    """Grey levels ``mean + std·z``, rounded and clipped to 0..255."""
    return np.clip(np.round(mean + std * z), 0, 255).astype(np.float32)


def _luminance(z: np.ndarray, mean: float = 80.0, std: float = 55.0) -> np.ndarray:
    """Grey levels with a log-normal (positively skewed) distribution of ``mean``/``std``, like natural scenes."""
    sigma = math.sqrt(math.log1p((std / mean) ** 2))
    return np.clip(np.round(mean * np.exp(sigma * z - sigma**2 / 2)), 0, 255).astype(np.float32)


def _affine_sample(texture: np.ndarray, theta: np.ndarray, padding: str = "reflection") -> np.ndarray:
    """Sample ``texture (h, w)`` through per-frame affine maps ``theta (T, 2, 3)`` → ``(T, H, W)``.

    ``theta`` maps output to input coordinates in ``F.affine_grid``'s normalised units (align_corners=False);
    the grid is built here directly, which is several times cheaper than ``F.affine_grid`` for small frames.
    """
    xs = ((np.arange(W) * 2 + 1) / W - 1).astype(np.float32)  # pixel centres in [-1, 1]
    ys = ((np.arange(H) * 2 + 1) / H - 1).astype(np.float32)
    th = theta.astype(np.float32)[:, :, :, None, None]  # (T, 2, 3, 1, 1)
    grid = th[:, :, 0] * xs[None, None, None, :] + th[:, :, 1] * ys[None, None, :, None] + th[:, :, 2]  # (T, 2, H, W)
    tex = torch.from_numpy(texture.astype(np.float32))[None, None].expand(len(theta), -1, -1, -1)  # (T, 1, h, w)
    grid_t = torch.from_numpy(np.ascontiguousarray(grid.transpose(0, 2, 3, 1)))  # (T, H, W, 2)
    return F.grid_sample(tex, grid_t, padding_mode=padding, align_corners=False)[:, 0].numpy()  # (T, H, W)


def _scene(rng: np.random.Generator, n: int) -> np.ndarray:
    """One shot ``(n, H, W)`` in z units: a 1/f scene under a moving camera, with 0–2 moving textured objects."""
    th, tw = 2 * H, 2 * W
    texture = _pink(rng, th, tw, alpha=rng.uniform(0.9, 1.4))
    t = np.arange(n, dtype=np.float64)
    heading = rng.uniform(0, 2 * math.pi)
    speed = rng.gamma(2.0, 0.15)  # texture px per frame
    jitter = np.cumsum(rng.normal(0, 0.08, size=(n, 2)), axis=0)  # hand-held camera wobble
    cx = rng.uniform(-0.25, 0.25) * tw / 2 + speed * math.cos(heading) * t + jitter[:, 0]
    cy = rng.uniform(-0.25, 0.25) * th / 2 + speed * math.sin(heading) * t + jitter[:, 1]
    scale = math.exp(rng.normal(0, 0.15)) * np.exp(rng.normal(0, 0.002) * t)  # texture px per view px; zoom
    rot = rng.normal(0, 0.05) + rng.normal(0, 0.0015) * t
    cos, sin = scale * np.cos(rot), scale * np.sin(rot)
    # Pixel-space map (x, y) → (cos·x − sin·y + cx, sin·x + cos·y + cy), in affine_grid's normalised units.
    theta = np.stack(
        [
            np.stack([cos * W / tw, -sin * H / tw, cx / (tw / 2)], axis=1),
            np.stack([sin * W / th, cos * H / th, cy / (th / 2)], axis=1),
        ],
        axis=1,
    )  # (n, 2, 3)
    frames = _affine_sample(texture, theta)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    for _ in range(int(rng.choice(3, p=[0.3, 0.45, 0.25]))):
        size = 32
        obj = _pink(rng, size, size, alpha=rng.uniform(0.8, 1.3)) * rng.uniform(0.6, 1.2) + rng.normal(0, 0.9)
        rx, ry = rng.uniform(4, 12, size=2)
        start = rng.uniform([-5, -5], [W + 5, H + 5])
        vel = rng.normal(0, 0.9, size=2)
        ox, oy = (start[0] + vel[0] * t).astype(np.float32), (start[1] + vel[1] * t).astype(np.float32)  # (n,)
        dx, dy = xx[None] - ox[:, None, None], yy[None] - oy[:, None, None]  # (n, H, W)
        radius = np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2)
        mask = 1 / (1 + np.exp((radius - 1) * np.float32(min(rx, ry))))  # soft edge ~1 px
        # The texture moves with the object: sample it at the offset from the object's centre.
        grid = torch.from_numpy(np.stack([dx, dy], axis=-1) / np.float32(size / 2))  # (n, H, W, 2)
        src = torch.from_numpy(obj.astype(np.float32))[None, None].expand(n, -1, -1, -1)
        inside = F.grid_sample(src, grid, padding_mode="reflection", align_corners=False)[:, 0].numpy()
        frames = frames + mask * (inside - frames)
    return frames


def natural_movie(rng: np.random.Generator, length: int = 300) -> np.ndarray:
    """``(T, H, W)`` natural-like movie in grey levels: shots of 40–120 frames with their own brightness/contrast."""
    frames = np.empty((length, H, W), dtype=np.float32)
    t = 0
    while t < length:
        n = min(int(rng.integers(40, 121)), length - t)
        mean = float(np.clip(rng.normal(84, 14), 45, 125))
        frames[t : t + n] = _luminance(_scene(rng, n), mean, mean * rng.uniform(0.65, 1.0))
        t += n
    return frames


def directional_pink_noise(rng: np.random.Generator, length: int) -> np.ndarray:
    """Oriented pink noise drifting orthogonally to its orientation, new direction every 27-frame block."""
    frames = np.empty((length, H, W), dtype=np.float32)
    fy, fx = np.fft.fftfreq(H)[:, None], np.fft.rfftfreq(W)[None, :]
    for b in range(0, length, 27):
        n = min(27, length - b)
        direction = rng.uniform(0, 2 * math.pi)
        spectrum = np.fft.rfft2(_pink(rng, H, W, alpha=1.0, orientation=direction))
        shift = rng.uniform(0.5, 2.0) * np.arange(n)[:, None, None]  # px along `direction`
        phase = np.exp(-2j * math.pi * shift * (fx * math.cos(direction) + fy * math.sin(direction)))
        z = np.fft.irfft2(spectrum[None] * phase, s=(H, W))  # exact sub-pixel translation (periodic)
        frames[b : b + n] = _to_grey(z, GREY, 45.0)
    return frames


def gaussian_dots(rng: np.random.Generator, length: int) -> np.ndarray:
    """A white or black Gaussian dot at one of 7×15 positions, new every 9 frames, on grey."""
    frames = np.full((length, H, W), GREY, dtype=np.float32)
    yy, xx = np.mgrid[0:H, 0:W]
    rows, cols = np.linspace(3, H - 4, 7), np.linspace(3, W - 4, 15)
    for b in range(0, length, 9):
        cy, cx = rows[rng.integers(7)], cols[rng.integers(15)]
        dot = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 3.0**2))
        peak = 255.0 if rng.random() < 0.5 else 0.0
        frames[b : b + 9] = np.round(GREY + (peak - GREY) * dot)
    return frames


def random_dots(rng: np.random.Generator, length: int, n_dots: int = 60) -> np.ndarray:
    """Random dot kinematogram: 60-frame blocks, 8 directions × 2 coherences × 2 speeds, 2×2 px black/white dots."""
    frames = np.full((length, H, W), GREY, dtype=np.float32)
    for b in range(0, length, 60):
        n = min(60, length - b)
        theta = 2 * math.pi * int(rng.integers(8)) / 8
        coherence, speed = float(rng.choice([0.5, 1.0])), float(rng.choice([1.0, 2.0]))
        coherent = rng.random(n_dots) < coherence
        noise_dir = rng.uniform(0, 2 * math.pi, size=(n, n_dots))
        heading = np.where(coherent[None], theta, noise_dir)  # (n, dots)
        steps = speed * np.stack([np.sin(heading), np.cos(heading)], axis=-1)  # (n, dots, [y, x])
        pos = rng.uniform([0, 0], [H, W], size=(1, n_dots, 2)) + np.cumsum(steps, axis=0)
        iy, ix = pos[..., 0].astype(np.int64) % H, pos[..., 1].astype(np.int64) % W
        colour = np.broadcast_to(rng.choice([0.0, 255.0], size=n_dots), (n, n_dots))
        f = np.broadcast_to(np.arange(n)[:, None], (n, n_dots)) + b
        for oy, ox in ((0, 0), (1, 0), (0, 1), (1, 1)):
            frames[f, (iy + oy) % H, (ix + ox) % W] = colour
    return frames


def drifting_gabor(rng: np.random.Generator, length: int) -> np.ndarray:
    """Gabor patches drifting in one of 8 directions × 3 SF × 3 TF per 25-frame block, on grey."""
    frames = np.full((length, H, W), GREY, dtype=np.float32)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    for b in range(0, length, 25):
        n = min(25, length - b)
        theta = 2 * math.pi * int(rng.integers(8)) / 8
        sf = float(rng.choice([0.04, 0.08, 0.16]))  # cycles / pixel
        tf = float(rng.choice([1.0, 2.0, 4.0])) / 30.0  # cycles / frame
        cy, cx = rng.uniform(8, H - 8), rng.uniform(12, W - 12)
        env = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 9.0**2))
        proj = (xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)
        phase = 2 * math.pi * (sf * proj[None] - tf * np.arange(n)[:, None, None])
        frames[b : b + n] = np.clip(np.round(GREY + GREY * env * np.cos(phase)), 0, 255)
    return frames


def image_flashes(rng: np.random.Generator, length: int) -> np.ndarray:
    """Static natural-like images for 15 frames, each followed by 12–18 grey frames."""
    frames = np.full((length, H, W), GREY, dtype=np.float32)
    t = 0
    while t < length:
        frames[t : t + 15] = _luminance(_pink(rng, H, W, alpha=rng.uniform(0.9, 1.4)))
        t += 15 + int(rng.integers(12, 19))
    return frames


OOD_GENERATORS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "pink_noise": directional_pink_noise,
    "gaussian_dots": gaussian_dots,
    "random_dots": random_dots,
    "drifting_gabor": drifting_gabor,
    "image": image_flashes,
}


def ood_length(rng: np.random.Generator, stimulus_type: str) -> int:
    """Trial lengths in frames like the real bonus tiers: pink noise 313–324, flashed images 305–414, Gaussian dots
    315, random dots 240, drifting Gabors 300 (the release of https://arxiv.org/abs/2305.19654)."""
    if stimulus_type == "pink_noise":
        return int(rng.integers(313, 325))
    if stimulus_type == "image":
        return int(rng.integers(305, 415))
    return {"gaussian_dots": 315, "random_dots": 240, "drifting_gabor": 300}[stimulus_type]


# ------------------------------------------------------------------------------------------------ behaviour
@dataclass(frozen=True)
class MouseBehaviour:
    """Per-mouse behaviour constants: typical pupil size, resting eye position, how much it runs."""

    pupil_mean: float
    eye_reference: tuple[float, float]
    run_propensity: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> MouseBehaviour:
        return cls(
            pupil_mean=float(rng.uniform(40, 55)),
            eye_reference=(float(rng.uniform(122, 154)), float(rng.uniform(122, 154))),
            run_propensity=float(rng.uniform(0.5, 1.5)),
        )


def behaviour(rng: np.random.Generator, length: int, mouse: MouseBehaviour) -> tuple[np.ndarray, np.ndarray]:
    """``behavior (T, 2)`` = [pupil size, running speed] and ``pupil_center (T, 2)`` = [x, y] camera px.

    Running: a two-state (still / run) Markov chain whose bouts have their own target speed, approached smoothly.
    Pupil: a per-trial arousal level plus slow dynamics that follow running. Eye: slow fixational drift back to
    the resting position plus saccade-like jumps (more often while running).
    """
    arousal = float(rng.normal())
    p_start = mouse.run_propensity * math.exp(0.6 * arousal) / 300.0
    p_stop = math.exp(-0.4 * arousal) / 120.0
    u = rng.random((length, 2)).tolist()
    targets = np.clip(rng.lognormal(math.log(8.0), 0.5, size=length), 1.0, 25.0).tolist()
    n_speed, n_pupil = rng.normal(0, 0.35, size=length).tolist(), rng.normal(0, 0.35, size=length).tolist()
    drift = rng.normal(0, 0.12, size=(length, 2)).tolist()
    jumps = (rng.normal(0, 1, size=(length, 2)) * [4.0, 3.0]).tolist()
    running, pupil, center = np.empty(length), np.empty(length), np.empty((length, 2))
    state = rng.random() < p_start / (p_start + p_stop)
    goal = targets[0] if state else 0.0
    speed = goal * float(rng.uniform(0.5, 1.0))
    base = mouse.pupil_mean + 11.0 * arousal
    p = base + 4.0 * float(rng.normal()) + (6.0 if state else 0.0)
    ref_x, ref_y = mouse.eye_reference
    x, y = ref_x + 3.5 * float(rng.normal()), ref_y + 3.5 * float(rng.normal())
    for i in range(length):
        if state and u[i][0] < p_stop:
            state, goal = False, 0.0
        elif not state and u[i][0] < p_start:
            state, goal = True, targets[i]
        speed = max(speed + (goal - speed) / 12.0 + (n_speed[i] if state else 0.0), 0.0)
        running[i] = speed if speed > 0.05 else 0.0
        p += (base + 0.8 * speed - p) / 60.0 + n_pupil[i]
        pupil[i] = max(p, 10.0)
        x += (ref_x - x) / 250.0 + drift[i][0]
        y += (ref_y - y) / 250.0 + drift[i][1]
        if u[i][1] < (1 / 30 if state else 1 / 75):  # saccade
            x, y = x + jumps[i][0], y + jumps[i][1]
        center[i] = (x, y)
    return np.stack([pupil, running], axis=1), center
