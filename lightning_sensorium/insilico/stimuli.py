"""Parametric stimuli at the release's 36 × 64 and 30 Hz, and the behaviour state they are shown with.

Coordinates are full-resolution pixels, x to the right and y downwards, pixel centres at integers. A grating's
*direction* is the direction its wave vector points and it drifts in (degrees, 0 = rightwards, 90 = downwards); its
*orientation* is that direction modulo 180 — the convention of the digital twins' ``NeuronParameters.orientation``.
Contrast c ∈ [0, 1] scales the largest amplitude about the grey level that stays within 0..255.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lightning_sensorium.data.layout import FPS


@dataclass(frozen=True)
class Canvas:
    """The screen: frame size, frame rate and the blank grey level every stimulus is drawn about."""

    height: int = 36
    width: int = 64
    fps: float = FPS
    grey: float = 80.0

    @property
    def amplitude(self) -> float:
        """The largest excursion about ``grey`` that stays within 0..255."""
        return float(min(self.grey, 255.0 - self.grey))

    def blank(self, frames: int) -> np.ndarray:
        """``(frames, H, W)`` of grey."""
        return np.full((frames, self.height, self.width), self.grey, dtype=np.float32)

    def coordinates(self) -> tuple[np.ndarray, np.ndarray]:
        """Pixel-centre coordinates ``x (1, W)`` and ``y (H, 1)``."""
        return np.arange(self.width, dtype=np.float64)[None, :], np.arange(self.height, dtype=np.float64)[:, None]


def check_canvas(canvas: Canvas, video_shape: tuple[int, int], fps: float) -> None:
    """Raise unless the stimuli match the responder's frame size and frame rate."""
    if (canvas.height, canvas.width) != tuple(video_shape):
        raise ValueError(
            f"stimulus size {canvas.height}×{canvas.width}: the model sees {video_shape[0]}×{video_shape[1]} frames"
        )
    if not math.isclose(canvas.fps, fps):
        raise ValueError(f"stimulus frame rate {canvas.fps:g} Hz: the model was trained at {fps:g} Hz")


def aperture(canvas: Canvas, center: tuple[float, float], outer: float, inner: float = 0.0) -> np.ndarray:
    """``(H, W)`` mask in [0, 1]: a disk of diameter ``outer`` (inf: the whole screen) with a hole of diameter
    ``inner`` (an annulus), centred at ``center`` (x, y); edges anti-aliased over one pixel."""
    x, y = canvas.coordinates()
    r = np.hypot(x - center[0], y - center[1])  # (H, W)
    out = np.clip(outer / 2 - r + 0.5, 0.0, 1.0) if math.isfinite(outer) else np.ones_like(r)
    if inner > 0:
        out = out * np.clip(r - inner / 2 + 0.5, 0.0, 1.0)
    return out


def grating(
    canvas: Canvas,
    frames: int,
    direction: float,
    sf: float,
    tf: float,
    contrast: float = 1.0,
    phase: float = 0.0,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """A drifting sinusoidal grating ``(frames, H, W)``: ``sf`` cycles/px, ``tf`` Hz, drifting towards ``direction``."""
    if not 0.0 <= contrast <= 1.0:
        raise ValueError(f"contrast {contrast}: expected a value in [0, 1]")
    x, y = canvas.coordinates()
    theta = math.radians(direction)
    space = 2 * math.pi * sf * (x * math.cos(theta) + y * math.sin(theta))  # (H, W)
    t = np.arange(frames, dtype=np.float64)[:, None, None] / canvas.fps
    wave = np.cos(space[None] - 2 * math.pi * tf * t + phase)  # (T, H, W)
    if mask is not None:
        wave = wave * mask
    return (canvas.grey + contrast * canvas.amplitude * wave).astype(np.float32)


def sparse_noise(
    canvas: Canvas,
    rng: np.random.Generator,
    flashes: int,
    squares: int = 4,
    size: int = 4,
    contrast: float = 1.0,
) -> np.ndarray:
    """Sparse noise: ``flashes`` frames of ``squares`` random ``size``-px squares, black or white, on grey.

    Returns the signed contrast of each flash ``(flashes, H, W)`` in {−1, 0, 1} (later squares cover earlier ones);
    the frames are ``canvas.grey + contrast · amplitude · sign`` (:func:`render_flashes`).
    """
    h, w = canvas.height, canvas.width
    # Drawn on a canvas padded by size − 1 and cropped: every pixel is covered equally often, edges included.
    sign = np.zeros((flashes, h + 2 * (size - 1), w + 2 * (size - 1)), dtype=np.float32)
    ys = rng.integers(0, h + size - 1, size=(flashes, squares))
    xs = rng.integers(0, w + size - 1, size=(flashes, squares))
    polarity = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=(flashes, squares))
    for k in range(flashes):
        for y, x, p in zip(ys[k], xs[k], polarity[k], strict=True):
            sign[k, y : y + size, x : x + size] = p
    return sign[:, size - 1 : size - 1 + h, size - 1 : size - 1 + w] * np.float32(contrast)


def square_grid(canvas: Canvas, rng: np.random.Generator, size: int = 4, stride: int = 2) -> np.ndarray:
    """Sparse noise on a grid: one ``size``-px square per flash, black and white at every ``stride``-px position
    (squares may overhang the edges, so every pixel is covered equally often), in a random order.

    Returns the signed contrast of each flash ``(K, H, W)`` in {−1, 0, 1}.
    """
    h, w = canvas.height, canvas.width
    tops = [(y, x) for y in range(-(size // 2), h, stride) for x in range(-(size // 2), w, stride)]
    sign = np.zeros((2 * len(tops), h, w), dtype=np.float32)
    for k, (y, x) in enumerate(tops):
        sign[2 * k, max(y, 0) : y + size, max(x, 0) : x + size] = 1.0
        sign[2 * k + 1, max(y, 0) : y + size, max(x, 0) : x + size] = -1.0
    return sign[rng.permutation(len(sign))]


def white_noise(
    canvas: Canvas, rng: np.random.Generator, flashes: int, block: int = 4, contrast: float = 1.0
) -> np.ndarray:
    """Binary white noise: ``flashes`` frames of ``block``-px checks, each ±``contrast`` (signed, ``(K, H, W)``)."""
    gh, gw = -(-canvas.height // block), -(-canvas.width // block)
    checks = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=(flashes, gh, gw))
    full = checks.repeat(block, axis=1).repeat(block, axis=2)  # (flashes, gh·block, gw·block)
    return full[:, : canvas.height, : canvas.width] * np.float32(contrast)


def render_flashes(canvas: Canvas, signed: np.ndarray, hold: int, gap: int = 0) -> np.ndarray:
    """Frames ``(K · (hold + gap), H, W)`` showing each signed-contrast image ``(K, H, W)`` for ``hold`` frames then
    grey for ``gap`` frames."""
    k = len(signed)
    images = canvas.grey + canvas.amplitude * signed  # (K, H, W)
    out = np.full((k, hold + gap, canvas.height, canvas.width), canvas.grey, dtype=np.float32)
    out[:, :hold] = images[:, None]
    return out.reshape(k * (hold + gap), canvas.height, canvas.width)  # (K·(hold+gap), H, W)


def flashed_images(canvas: Canvas, images: np.ndarray, hold: int, gap: int) -> np.ndarray:
    """Grey-level ``images (K, H, W)`` flashed for ``hold`` frames each, ``gap`` grey frames after each."""
    if images.ndim != 3 or images.shape[1:] != (canvas.height, canvas.width):
        raise ValueError(f"images shape {images.shape}: expected (K, {canvas.height}, {canvas.width})")
    return render_flashes(canvas, (images.astype(np.float32) - canvas.grey) / max(canvas.amplitude, 1e-6), hold, gap)


# ------------------------------------------------------------------------------------------------ behaviour
@dataclass(frozen=True)
class BehaviorState:
    """The behaviour of a presentation: a fixed pupil size and running speed (the release's raw units), or a
    ``recorded`` trace ``(T, 2)`` [pupil size, speed] whose first frames are used (its means describe it)."""

    name: str
    pupil_size: float
    speed: float
    recorded: np.ndarray | None = None

    @classmethod
    def from_trace(cls, name: str, trace: np.ndarray) -> BehaviorState:
        trace = np.asarray(trace, dtype=np.float32)
        if trace.ndim != 2 or trace.shape[1] != 2 or not np.isfinite(trace).all():
            raise ValueError(f"behaviour trace {name}: shape {trace.shape}, expected finite (T, 2) [pupil, speed]")
        return cls(name, float(trace[:, 0].mean()), float(trace[:, 1].mean()), trace)

    def trace(self, frames: int) -> np.ndarray:
        """``behavior (frames, 2)`` = [pupil size, running speed]."""
        if self.recorded is not None:
            if len(self.recorded) < frames:
                raise ValueError(f"behaviour trace {self.name}: {len(self.recorded)} frames, the stimuli need {frames}")
            return self.recorded[:frames]
        return np.tile(np.array([[self.pupil_size, self.speed]], dtype=np.float32), (frames, 1))


def standard_states(behavior_mean: np.ndarray, behavior_std: np.ndarray) -> dict[str, BehaviorState]:
    """Named states from a mouse's behaviour statistics ``(2,)``: ``quiet`` (speed 0, mean pupil), ``running``
    (mean + 2 std of speed), ``small_pupil`` / ``large_pupil`` (mean ∓ 1 std, speed 0)."""
    pupil, speed = float(behavior_mean[0]), float(behavior_mean[1])
    pupil_sd, speed_sd = float(behavior_std[0]), float(behavior_std[1])
    return {
        "quiet": BehaviorState("quiet", pupil, 0.0),
        "running": BehaviorState("running", pupil, max(speed + 2 * speed_sd, 1.0)),
        "small_pupil": BehaviorState("small_pupil", pupil - pupil_sd, 0.0),
        "large_pupil": BehaviorState("large_pupil", pupil + pupil_sd, 0.0),
    }


def fixed_gaze(center: Sequence[float] | np.ndarray, frames: int) -> np.ndarray:
    """``pupil_center (frames, 2)`` held at ``center`` (x, y camera px)."""
    return np.tile(np.asarray(center, dtype=np.float32)[None], (frames, 1))
