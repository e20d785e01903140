"""Most exciting inputs (MEIs): the image and the video that drive a neuron most, by gradient ascent on a
differentiable responder, as in sinzlab/mei (https://github.com/sinzlab/mei) and ViV1T's closed-loop follow-up
(https://github.com/bryanlimy/ViV1T-closed-loop, ``most_exciting_stimulus/``).

The stimulus is a deviation from grey in units of the screen's amplitude, kept within [−1, 1] (grey levels 0..255)
and under an RMS-contrast budget (its L2 norm, the usual contrast constraint). Each step shows it randomly shifted
by up to ``jitter`` px and follows the gradient blurred by a Gaussian (σ ``blur`` px: the preconditioning that
keeps MEIs smooth); several seeds start from different low-contrast noise. The activation reached is compared with
the best of a set of natural clips shown for as long (``activation / best_natural``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lightning_sensorium.insilico.experiments import Result, _state, _track, canvas_of, clip_responses
from lightning_sensorium.insilico.responders import Responder
from lightning_sensorium.insilico.stimuli import BehaviorState, fixed_gaze


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur over the last two axes of ``x (B, ..., H, W)``."""
    if sigma <= 0:
        return x
    r = max(1, int(math.ceil(3 * sigma)))
    g = torch.exp(-(torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    shape = x.shape
    y = x.reshape(-1, 1, *shape[-2:])  # (B·..., 1, H, W)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), g.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), g.view(1, 1, -1, 1))
    return y.reshape(shape)


def _constrain(x: torch.Tensor, budget: float) -> torch.Tensor:
    """Clip ``x (B, ..., H, W)`` to [−1, 1] and scale each row down to an RMS of at most ``budget``."""
    x = x.clamp(-1.0, 1.0)
    rms = x.flatten(1).square().mean(1).sqrt().clamp_min(1e-12)  # (B,)
    scale = torch.clamp(budget / rms, max=1.0).view(-1, *([1] * (x.dim() - 1)))
    return x * scale


def flash_onset(frames: int, window: int) -> int:
    """First frame of a flashed MEI image: it is on for the last ``2 · window`` frames (the response is measured over
    the last ``window``), so that transient neurons see its onset."""
    return max(0, frames - 2 * window)


def optimise(
    responder: Responder,
    index: np.ndarray,
    *,
    video: bool,
    frames: int,
    window: int,
    steps: int,
    lr: float,
    budget: float,
    blur: float,
    jitter: int,
    seed: int,
    state: BehaviorState,
) -> tuple[np.ndarray, np.ndarray]:
    """Gradient ascent for the neurons ``index`` (one batch): the stimuli ``(n, [T,] H, W)`` in grey levels and
    the activation each reaches (mean rate over the last ``window`` frames, without jitter)."""
    canvas = canvas_of(responder)
    h, w, dev = canvas.height, canvas.width, responder.device
    n = len(index)
    gen = torch.Generator().manual_seed(seed)
    shape = (n, frames, h, w) if video else (n, h, w)
    x = _constrain(0.1 * torch.randn(shape, generator=gen), budget).to(dev)
    behavior = torch.from_numpy(state.trace(frames).T.copy()).to(dev).expand(n, 2, frames)
    gaze = torch.from_numpy(fixed_gaze(responder.rest_pupil_center, frames).T.copy()).to(dev).expand(n, 2, frames)
    rows, cols = torch.arange(n, device=dev), torch.from_numpy(index).to(dev)

    onset = flash_onset(frames, window)

    def show(z: torch.Tensor) -> torch.Tensor:
        if video:
            frames_of = z
        else:  # grey, then the image flashed on for the last 2 · window frames
            on = (torch.arange(frames, device=z.device) >= onset).to(z.dtype)  # (T,)
            frames_of = z[:, None] * on[None, :, None, None]  # (n, T, H, W)
        return (canvas.grey + canvas.amplitude * frames_of)[:, None]  # (n, 1, T, H, W)

    def activation(z: torch.Tensor) -> torch.Tensor:
        rates = responder(show(z), behavior, gaze)  # (n, N, T)
        return rates[rows, cols, -window:].nanmean(-1)  # (n,)

    for _ in range(steps):
        z = x.clone().requires_grad_(True)
        dy, dx = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=gen))
        act = activation(torch.roll(z, shifts=(dy, dx), dims=(-2, -1)))
        act.sum().backward()
        assert z.grad is not None
        g = _blur(z.grad, blur)
        g = g / g.flatten(1).abs().mean(1).clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))
        x = _constrain(x + lr * g, budget)
    with torch.no_grad():
        final = activation(x).float().cpu().numpy()
        grey_levels = (canvas.grey + canvas.amplitude * x).float().cpu().numpy()
    return grey_levels, final


def most_exciting_inputs(
    responder: Responder,
    neurons: Sequence[int] | None = None,
    *,
    frames: int = 40,
    window: int = 10,
    steps: int = 100,
    lr: float = 0.05,
    budget: float = 0.25,
    blur: float = 1.0,
    jitter: int = 2,
    seeds: int = 2,
    seed: int = 0,
    natural: Sequence[np.ndarray] | None = None,
    state: BehaviorState | str | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> Result:
    """The MEI image (flashed on grey for the last ``2 · window`` of ``frames`` frames) and MEI video (``frames``
    frames) of each neuron, the best of
    ``seeds`` runs each, with the activation reached and the best ``natural`` clip's (default: 8 synthetic natural
    movies of ``frames`` frames, :func:`lightning_sensorium.data.stimuli.natural_movie`, seeded by ``seed``)."""
    if not responder.differentiable:
        raise ValueError(f"{type(responder).__name__} is not differentiable: MEIs need a trained model")
    if not 0 < budget <= 1:
        raise ValueError(f"budget {budget}: the RMS contrast must lie in (0, 1]")
    index = responder.neuron_index(neurons)
    behavior = _state(responder, state)
    canvas = canvas_of(responder)
    n, h, w = len(index), canvas.height, canvas.width
    images = np.zeros((n, h, w), np.float32)
    videos = np.zeros((n, frames, h, w), np.float32)
    act = np.full((n, 2, seeds), -np.inf, np.float32)  # (neuron, image|video, seed)
    options: dict[str, Any] = {
        "frames": frames,
        "window": window,
        "steps": steps,
        "lr": lr,
        "budget": budget,
        "blur": blur,
    }
    for lo in _track(range(0, n, batch_size), progress, "MEIs"):
        chunk = index[lo : lo + batch_size]
        for kind, is_video in enumerate((False, True)):
            for s in range(seeds):
                stim, reached = optimise(
                    responder, chunk, video=is_video, jitter=jitter, seed=seed + s, state=behavior, **options
                )
                better = reached > act[lo : lo + len(chunk), kind].max(1)
                target = videos if is_video else images
                target[lo : lo + len(chunk)][better] = stim[better]
                act[lo : lo + len(chunk), kind, s] = reached
    if natural is None:
        from lightning_sensorium.data.stimuli import natural_movie

        rng = np.random.default_rng(seed)
        natural = [natural_movie(rng, frames) for _ in range(8)]
    clips = clip_responses(responder, list(natural), responder.unit_ids[index], settle=frames - window, state=behavior)
    best_natural = clips["clip_response"].max(1)  # (n,)
    best = act.max(2)  # (n, 2)
    return Result(
        "mei",
        responder.mouse_id,
        responder.unit_ids[index],
        {
            "mei_image": (("neuron", "y", "x"), images),
            "mei_video": (("neuron", "frame", "y", "x"), videos),
            "activation": (("neuron", "kind", "seed"), act),
            "best_natural": (("neuron",), best_natural),
            "image_vs_natural": (("neuron",), best[:, 0] / np.maximum(best_natural, 1e-12)),
            "video_vs_natural": (("neuron",), best[:, 1] / np.maximum(best_natural, 1e-12)),
            "kind": (("kind",), np.array(["image", "video"])),
        },
        {**options, "jitter": jitter, "seeds": seeds, "seed": seed, "budget_units": "RMS of (grey − grey0)/amplitude"},
    )
