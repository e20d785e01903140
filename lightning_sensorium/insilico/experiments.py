"""The classic experiments of a visual physiologist, run on any responder, each returning per-neuron results and
the curves behind them (:class:`Result`).

* :func:`receptive_fields`: sparse-noise reverse correlation — the response-weighted average of the flashed
  squares' contrast (linear STA, Gabor-like for simple cells) and of their absolute contrast (energy STA, which maps
  complex cells too) → RF centre and diameter; :func:`gradient_receptive_fields`: the gradient of the response
  with respect to the video (the linearised RF) for differentiable responders.
* :func:`grating_tuning`: drifting gratings over directions × spatial × temporal frequencies → preferred
  direction, orientation, SF and TF, OSI, DSI and F1/F0 (simple vs complex).
* :func:`size_tuning`: gratings in disks (or annuli) of growing diameter at each neuron's RF centre → preferred
  size, surround-suppression index.
* :func:`behavior_modulation`: the same gratings under quiet vs running and small vs large pupil → gains.

Stimuli are presented in batches built on demand (:func:`present`), so memory is bounded by the batch size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lightning_sensorium.insilico.responders import Responder
from lightning_sensorium.insilico.stimuli import (
    BehaviorState,
    Canvas,
    aperture,
    check_canvas,
    fixed_gaze,
    grating,
    render_flashes,
    square_grid,
    standard_states,
)

Variables = dict[str, tuple[tuple[str, ...], np.ndarray]]


@dataclass
class Result:
    """One experiment's output: named arrays with their dimension names (``neuron`` first for per-neuron values)."""

    experiment: str
    mouse_id: str
    unit_ids: np.ndarray
    variables: Variables = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.variables[name][1]


def canvas_of(responder: Responder) -> Canvas:
    """The responder's screen: its frame size and rate, blank at its training grey level."""
    height, width = responder.video_shape
    return Canvas(height=height, width=width, fps=responder.fps, grey=float(responder.grey))


def present(
    responder: Responder,
    count: int,
    make: Callable[[np.ndarray], np.ndarray],
    behavior: np.ndarray,
    reduce: Callable[[torch.Tensor, np.ndarray], np.ndarray],
    batch_size: int = 8,
    progress: bool = False,
    label: str = "presenting",
    canvas: Canvas | None = None,
) -> np.ndarray:
    """Show ``count`` stimuli in batches; concatenate ``reduce(rates (b, N, T), indices)`` over the batches.

    ``make(indices)`` draws the grey-level videos ``(b, T, H, W)`` of those stimuli (checked: size, 0..255),
    shown with ``behavior (T, 2)`` and the responder's resting gaze.
    """
    if canvas is not None:
        check_canvas(canvas, responder.video_shape, responder.fps)
    outputs: list[np.ndarray] = []
    starts = range(0, count, batch_size)
    for lo in _track(starts, progress, label):
        idx = np.arange(lo, min(lo + batch_size, count))
        videos = make(idx)
        if videos.ndim != 4 or tuple(videos.shape[2:]) != tuple(responder.video_shape):
            raise ValueError(f"stimulus shape {videos.shape[1:]}: expected (T, {responder.video_shape})")
        if videos.min() < 0 or videos.max() > 255:
            raise ValueError(f"stimulus grey levels {videos.min():g}..{videos.max():g}: expected 0..255")
        b, t = videos.shape[:2]
        video = torch.from_numpy(np.ascontiguousarray(videos, dtype=np.float32))[:, None]  # (b, 1, T, H, W)
        beh = torch.from_numpy(np.array(np.broadcast_to(behavior.T, (b, 2, t)), dtype=np.float32))  # a writable copy
        gaze = fixed_gaze(responder.rest_pupil_center, t).T  # (2, T)
        pupil = torch.from_numpy(np.array(np.broadcast_to(gaze, (b, 2, t)), dtype=np.float32))
        with torch.no_grad():
            rates = responder(video, beh, pupil).float().cpu()  # (b, N, T)
        outputs.append(reduce(rates, idx))
    return np.concatenate(outputs)


def _track(items: Sequence[int], show: bool, label: str) -> Any:
    if not show:
        return items
    from rich.progress import track

    return track(items, description=label, transient=True)


def _window_mean(rates: torch.Tensor, start: int) -> torch.Tensor:
    """NaN-aware mean of ``rates (b, N, T)`` over frames ``start:`` → ``(b, N)``."""
    return torch.nanmean(rates[..., start:], dim=-1)


def _state(responder: Responder, state: BehaviorState | str | None) -> BehaviorState:
    if isinstance(state, BehaviorState):
        return state
    states = standard_states(responder.behavior_mean, responder.behavior_std)
    name = state or "quiet"
    if name not in states:
        raise ValueError(f"behaviour state {name!r}: expected one of {sorted(states)}")
    return states[name]


# ------------------------------------------------------------------------------------------------ receptive fields
def _smooth(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of ``maps (n, H, W)`` (σ in px, reflect padding)."""
    r = max(1, int(math.ceil(3 * sigma)))
    g = torch.exp(-(torch.arange(-r, r + 1, dtype=torch.float32) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    x = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[:, None]  # (n, 1, H, W)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), g.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), g.view(1, 1, -1, 1))
    return x[:, 0].numpy()


def rf_center_size(energy: np.ndarray, sigma: float = 1.0, radius: float = 10.0) -> dict[str, np.ndarray]:
    """Centre ``(n, 2)`` (x, y px), diameter ``(n,)`` and peak-to-noise ratio of RF energy maps ``(n, H, W)``.

    The map is smoothed (σ px); around its peak (within ``radius``), the centre is the centroid of the part above
    half the peak and the diameter that of a disk with the same area.
    """
    n, h, w = energy.shape
    sm = _smooth(energy, sigma)
    sm = sm - np.median(sm.reshape(n, -1), 1)[:, None, None]  # the flat background is 0
    flat = sm.reshape(n, -1)
    peak_at = flat.argmax(1)
    peak = flat[np.arange(n), peak_at]
    py, px = np.divmod(peak_at, w)
    yy, xx = np.mgrid[0:h, 0:w]
    near = np.hypot(xx[None] - px[:, None, None], yy[None] - py[:, None, None]) <= radius  # (n, H, W)
    above = np.where(near, np.maximum(sm - 0.5 * peak[:, None, None], 0.0), 0.0)
    mass = above.sum((1, 2)) + 1e-12
    cx, cy = (above * xx).sum((1, 2)) / mass, (above * yy).sum((1, 2)) / mass
    diameter = 2 * np.sqrt((above > 0).sum((1, 2)) / math.pi)
    far = np.where(near, np.nan, sm).reshape(n, -1)
    noise = np.nanmedian(np.abs(far - np.nanmedian(far, 1, keepdims=True)), 1) * 1.4826 + 1e-12
    return {"center": np.stack([cx, cy], 1), "diameter": diameter, "snr": peak / noise}


def receptive_fields(
    responder: Responder,
    neurons: Sequence[int] | None = None,
    *,
    size: int = 4,
    stride: int = 2,
    hold: int = 3,
    gap: int = 9,
    per_trial: int = 100,
    lead: int = 30,
    state: BehaviorState | str | None = None,
    seed: int = 0,
    batch_size: int = 4,
    progress: bool = False,
) -> Result:
    """Sparse-noise RF mapping (see the module docstring): maps ``(neuron, y, x)``, centre, diameter.

    A flash's response is its time course over the ``hold + gap`` frames after its onset (``hold``-frame means); the
    energy map weights each flash by the distance of that time course from the mean one (any sign or latency, so
    transient and complex cells map too), the linear map by its response at the neuron's latency (the lag where its
    responses vary most).
    """
    canvas = canvas_of(responder)
    index = responder.neuron_index(neurons)
    signed = square_grid(canvas, np.random.default_rng(seed), size, stride)  # (K, H, W)
    flashes, every = len(signed), hold + gap
    trials = -(-flashes // per_trial)
    frames = lead + per_trial * every + every
    behavior = _state(responder, state).trace(frames)
    lags = np.arange(every)

    def make(idx: np.ndarray) -> np.ndarray:
        out = np.stack([canvas.blank(frames) for _ in idx])  # (b, T, H, W)
        for j, trial in enumerate(idx):
            chunk = signed[trial * per_trial : (trial + 1) * per_trial]
            out[j, lead : lead + len(chunk) * every] = render_flashes(canvas, chunk, hold, gap)
        return out

    def reduce(rates: torch.Tensor, idx: np.ndarray) -> np.ndarray:
        r = rates[:, index]  # (b, n, T)
        onsets = lead + np.arange(per_trial) * every  # (P,)
        at = onsets[:, None, None] + lags[None, :, None] + np.arange(hold)[None, None, :]  # (P, L, hold)
        x = r[:, :, torch.from_numpy(at)].nanmean(-1)  # (b, n, P, L)
        return x.permute(0, 2, 3, 1).reshape(-1, len(lags), len(index)).numpy()  # (b·P, L, n)

    x = present(responder, trials, make, behavior, reduce, batch_size, progress, "RF: sparse noise", canvas)[:flashes]
    x = np.nan_to_num(x - np.nanmean(x, 0, keepdims=True))  # (K, L, n) deviation from the mean flash response
    lag = (x**2).mean(0).argmax(0)  # (n,) the latency with the most stimulus-driven variance
    flat = signed.reshape(flashes, -1).astype(np.float64)  # (K, H·W)
    h, w = canvas.height, canvas.width
    hits = np.maximum(np.abs(flat).sum(0), 1.0)  # (H·W,) flashes that covered each pixel
    # Energy: how far each flash's response time course is from the mean one, whatever its sign and latency.
    energy = (np.sqrt((x**2).sum(1)).T @ np.abs(flat) / hits).reshape(-1, h, w)  # (n, H, W)
    linear = (x[:, lag, np.arange(len(index))].T @ flat / hits).reshape(-1, h, w)  # (n, H, W) at the latency
    found = rf_center_size(energy)
    return Result(
        "receptive_field",
        responder.mouse_id,
        responder.unit_ids[index],
        {
            "rf_x": (("neuron",), found["center"][:, 0]),
            "rf_y": (("neuron",), found["center"][:, 1]),
            "rf_diameter": (("neuron",), found["diameter"]),
            "rf_snr": (("neuron",), found["snr"]),
            "latency": (("neuron",), lag.astype(np.int64)),
            "sta_energy": (("neuron", "y", "x"), energy.astype(np.float32)),
            "sta_linear": (("neuron", "y", "x"), linear.astype(np.float32)),
        },
        {
            "flashes": flashes,
            "size": size,
            "stride": stride,
            "hold": hold,
            "gap": gap,
            "seed": seed,
            "units": "px, 30 Hz frames",
        },
    )


def gradient_receptive_fields(
    responder: Responder,
    neurons: Sequence[int] | None = None,
    *,
    frames: int = 60,
    window: int = 10,
    contrast: float = 0.1,
    seeds: int = 2,
    state: BehaviorState | str | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> Result:
    """The linearised RF: d(mean response over the last ``window`` frames)/d(video), summed over frames (linear map)
    and as root of the summed squares (energy map), averaged over ``seeds`` low-contrast noise backgrounds."""
    if not responder.differentiable:
        raise ValueError(
            f"{type(responder).__name__} is not differentiable: map its receptive fields with sparse noise (rf)"
        )
    canvas = canvas_of(responder)
    check_canvas(canvas, responder.video_shape, responder.fps)
    index = responder.neuron_index(neurons)
    h, w = canvas.height, canvas.width
    behavior = torch.from_numpy(_state(responder, state).trace(frames).T.copy())  # (2, T)
    gaze = torch.from_numpy(fixed_gaze(responder.rest_pupil_center, frames).T.copy())  # (2, T)
    linear = np.zeros((len(index), h, w))
    energy = np.zeros((len(index), h, w))
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        background = canvas.grey + contrast * canvas.amplitude * rng.standard_normal((frames, h, w))
        base = torch.from_numpy(np.clip(background, 0, 255).astype(np.float32))
        for lo in _track(range(0, len(index), batch_size), progress, f"gradient RF (seed {seed})"):
            chunk = index[lo : lo + batch_size]
            b = len(chunk)
            video = base[None, None].repeat(b, 1, 1, 1, 1).to(responder.device).requires_grad_(True)
            rates = responder(video, behavior.expand(b, 2, frames), gaze.expand(b, 2, frames))  # (b, N, T)
            own = rates[torch.arange(b), torch.from_numpy(chunk).to(rates.device), -window:]  # (b, window)
            own.nanmean(-1).sum().backward()
            assert video.grad is not None
            g = video.grad[:, 0].double().cpu().numpy()  # (b, T, H, W)
            linear[lo : lo + b] += g.sum(1) / seeds
            energy[lo : lo + b] += np.sqrt((g**2).sum(1)) / seeds
    found = rf_center_size(energy)
    return Result(
        "gradient_receptive_field",
        responder.mouse_id,
        responder.unit_ids[index],
        {
            "rf_x": (("neuron",), found["center"][:, 0]),
            "rf_y": (("neuron",), found["center"][:, 1]),
            "rf_diameter": (("neuron",), found["diameter"]),
            "rf_snr": (("neuron",), found["snr"]),
            "grad_energy": (("neuron", "y", "x"), energy.astype(np.float32)),
            "grad_linear": (("neuron", "y", "x"), linear.astype(np.float32)),
        },
        {"frames": frames, "window": window, "contrast": contrast, "seeds": seeds},
    )


# ------------------------------------------------------------------------------------------------ gratings
DIRECTIONS = tuple(float(d) for d in range(0, 360, 45))
SPATIAL_FREQUENCIES = (1 / 24, 1 / 18, 1 / 13, 1 / 10, 1 / 7)  # cycles per px
TEMPORAL_FREQUENCIES = (1.0, 2.0, 4.0)  # Hz


def _f1_f0(rates: torch.Tensor, start: int, tf: float, fps: float) -> torch.Tensor:
    """F1/F0 of ``rates (b, N, T)`` at ``tf`` Hz over the whole cycles that fit in frames ``start:`` → ``(b, N)``."""
    span = rates.shape[-1] - start
    cycles = math.floor(span * tf / fps)
    if cycles < 1:
        return torch.full(rates.shape[:2], float("nan"))
    n = int(round(cycles * fps / tf))
    r = torch.nan_to_num(rates[..., -n:].double())  # (b, N, n)
    t = torch.arange(n, dtype=torch.float64) / fps
    f0 = r.mean(-1)
    f1 = 2 * torch.abs((r * torch.exp(-2j * math.pi * tf * t)).mean(-1))
    return (f1 / f0.clamp_min(1e-12)).float()


def grating_tuning(
    responder: Responder,
    neurons: Sequence[int] | None = None,
    *,
    directions: Sequence[float] = DIRECTIONS,
    sfs: Sequence[float] = SPATIAL_FREQUENCIES,
    tfs: Sequence[float] = TEMPORAL_FREQUENCIES,
    contrast: float = 1.0,
    duration: int = 60,
    lead: int = 15,
    settle: int = 15,
    state: BehaviorState | str | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> Result:
    """Full-field drifting gratings, every direction × SF × TF (``duration`` frames after ``lead`` grey frames;
    responses averaged after ``settle`` frames). Per neuron: preferred SF and TF (the condition of the largest
    response over directions), and at them the direction curve → preferred direction and orientation, OSI, DSI,
    F1/F0."""
    canvas = canvas_of(responder)
    index = responder.neuron_index(neurons)
    dirs, sfs_, tfs_ = np.asarray(directions, float), np.asarray(sfs, float), np.asarray(tfs, float)
    grid = np.stack(np.meshgrid(dirs, sfs_, tfs_, indexing="ij"), -1).reshape(-1, 3)  # (D·S·F, 3)
    frames = lead + duration
    behavior = _state(responder, state).trace(frames)

    def make(idx: np.ndarray) -> np.ndarray:
        out = np.stack([canvas.blank(frames) for _ in idx])
        for j, (d, sf, tf) in enumerate(grid[idx]):
            out[j, lead:] = grating(canvas, duration, d, sf, tf, contrast)
        return out

    def reduce(rates: torch.Tensor, idx: np.ndarray) -> np.ndarray:
        r = rates[:, index]  # (b, n, T)
        mean = _window_mean(r, lead + settle)  # (b, n)
        f1f0 = torch.stack([_f1_f0(r[j : j + 1], lead + settle, grid[i, 2], canvas.fps)[0] for j, i in enumerate(idx)])
        return torch.stack([mean, f1f0], -1).numpy()  # (b, n, 2)

    out = present(responder, len(grid), make, behavior, reduce, batch_size, progress, "tuning: gratings", canvas)
    shape = (len(dirs), len(sfs_), len(tfs_), len(index))
    resp = np.nan_to_num(out[..., 0]).reshape(shape).transpose(3, 0, 1, 2)  # (n, D, S, F)
    f1f0 = out[..., 1].reshape(shape).transpose(3, 0, 1, 2)
    n = len(index)
    best = resp.max(1).reshape(n, -1).argmax(1)  # (n,) over (S, F)
    si, ti = np.divmod(best, len(tfs_))
    curve = resp[np.arange(n), :, si, ti]  # (n, D) direction curve at the preferred SF and TF
    di = curve.argmax(1)
    step = 360.0 / len(dirs)
    null = (di + int(round(180 / step))) % len(dirs)
    orth = [(di + int(round(90 / step))) % len(dirs), (di - int(round(90 / step))) % len(dirs)]
    rp, rn = curve[np.arange(n), di], curve[np.arange(n), null]
    ro = 0.5 * (curve[np.arange(n), orth[0]] + curve[np.arange(n), orth[1]])
    # DSI at every TF (at the preferred SF): direction selectivity depends on the drift speed.
    by_tf = resp[np.arange(n), :, si, :]  # (n, D, F)
    pref_tf_dir = by_tf.argmax(1)  # (n, F)
    at = np.take_along_axis(by_tf, pref_tf_dir[:, None], 1)[:, 0]
    opposite = np.take_along_axis(by_tf, ((pref_tf_dir + int(round(180 / step))) % len(dirs))[:, None], 1)[:, 0]
    dsi_tf = (at - opposite) / np.maximum(at + opposite, 1e-12)  # (n, F)
    angle = np.deg2rad(dirs)
    gosi = np.abs((curve * np.exp(2j * angle)).sum(1)) / np.maximum(curve.sum(1), 1e-12)
    return Result(
        "tuning",
        responder.mouse_id,
        responder.unit_ids[index],
        {
            "pref_direction": (("neuron",), dirs[di]),
            "pref_orientation": (("neuron",), dirs[di] % 180.0),
            "pref_sf": (("neuron",), sfs_[si]),
            "pref_tf": (("neuron",), tfs_[ti]),
            "osi": (("neuron",), (rp - ro) / np.maximum(rp + ro, 1e-12)),
            "global_osi": (("neuron",), gosi),
            "dsi": (("neuron",), (rp - rn) / np.maximum(rp + rn, 1e-12)),
            "dsi_tf": (("neuron", "tf"), dsi_tf),
            "f1_f0": (("neuron",), f1f0[np.arange(n), di, si, ti]),
            "direction_curve": (("neuron", "direction"), curve),
            "responses": (("neuron", "direction", "sf", "tf"), resp),
            "f1_f0_all": (("neuron", "direction", "sf", "tf"), f1f0),
            "direction": (("direction",), dirs),
            "sf": (("sf",), sfs_),
            "tf": (("tf",), tfs_),
        },
        {"contrast": contrast, "duration": duration, "settle": settle, "units": "deg, cycles/px, Hz"},
    )


# ------------------------------------------------------------------------------------------------ size tuning
DIAMETERS = (4.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, math.inf)


def size_tuning(
    responder: Responder,
    neurons: Sequence[int] | None = None,
    *,
    centers: np.ndarray,
    directions: np.ndarray,
    sf: np.ndarray,
    tf: np.ndarray,
    diameters: Sequence[float] = DIAMETERS,
    annulus: bool = False,
    contrast: float = 1.0,
    duration: int = 45,
    lead: int = 15,
    settle: int = 15,
    state: BehaviorState | str | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> Result:
    """Each neuron's own grating (direction, SF, TF ``(n,)``) in a disk of growing diameter at its RF centre
    ``centers (n, 2)`` (or, with ``annulus``, outside a hole of growing diameter) → preferred size and
    surround-suppression index ``(R_max − R_largest) / R_max``."""
    canvas = canvas_of(responder)
    index = responder.neuron_index(neurons)
    n, sizes = len(index), np.asarray(diameters, float)
    for name, arr in (("centers", centers), ("directions", directions), ("sf", sf), ("tf", tf)):
        if len(arr) != n:
            raise ValueError(f"size tuning: {name} has {len(arr)} rows for {n} neurons")
    frames = lead + duration
    behavior = _state(responder, state).trace(frames)

    def make(idx: np.ndarray) -> np.ndarray:
        out = np.stack([canvas.blank(frames) for _ in idx])
        for j, k in enumerate(idx):
            i, s = divmod(int(k), len(sizes))
            center = (float(centers[i, 0]), float(centers[i, 1]))
            mask = aperture(canvas, center, math.inf, sizes[s]) if annulus else aperture(canvas, center, sizes[s])
            out[j, lead:] = grating(canvas, duration, directions[i], sf[i], tf[i], contrast, mask=mask)
        return out

    def reduce(rates: torch.Tensor, idx: np.ndarray) -> np.ndarray:
        own = torch.from_numpy(index[idx // len(sizes)])
        return _window_mean(rates[torch.arange(len(idx)), own][:, None], lead + settle)[:, 0].numpy()  # (b,)

    out = present(responder, n * len(sizes), make, behavior, reduce, batch_size, progress, "size tuning", canvas)
    curve = np.nan_to_num(out).reshape(n, len(sizes))  # (n, sizes)
    peak = curve.argmax(1)
    rmax = curve[np.arange(n), peak]
    return Result(
        "annulus_tuning" if annulus else "size_tuning",
        responder.mouse_id,
        responder.unit_ids[index],
        {
            "pref_diameter": (("neuron",), sizes[peak]),
            "suppression_index": (("neuron",), (rmax - curve[:, -1]) / np.maximum(rmax, 1e-12)),
            "size_curve": (("neuron", "diameter"), curve),
            "diameter": (("diameter",), sizes),
        },
        {"annulus": annulus, "contrast": contrast, "units": "px (inf: full screen)"},
    )


# ------------------------------------------------------------------------------------------------ behaviour
def behavior_modulation(
    responder: Responder,
    neurons: Sequence[int] | None = None,
    *,
    states: dict[str, BehaviorState] | None = None,
    directions: Sequence[float] = DIRECTIONS,
    sfs: Sequence[float] = (1 / 18, 1 / 10),
    tf: float = 2.0,
    duration: int = 45,
    lead: int = 15,
    settle: int = 15,
    batch_size: int = 8,
    progress: bool = False,
) -> Result:
    """Mean response to full-field gratings (every direction × ``sfs``) under each behaviour state (default:
    :func:`~lightning_sensorium.insilico.stimuli.standard_states`) → ``running_gain`` = running / quiet and
    ``pupil_gain`` = large / small pupil."""
    canvas = canvas_of(responder)
    index = responder.neuron_index(neurons)
    states = states or standard_states(responder.behavior_mean, responder.behavior_std)
    grid = np.stack(np.meshgrid(np.asarray(directions, float), np.asarray(sfs, float), indexing="ij"), -1).reshape(
        -1, 2
    )
    frames = lead + duration

    def make(idx: np.ndarray) -> np.ndarray:
        out = np.stack([canvas.blank(frames) for _ in idx])
        for j, (d, sf) in enumerate(grid[idx]):
            out[j, lead:] = grating(canvas, duration, d, sf, tf)
        return out

    def reduce(rates: torch.Tensor, idx: np.ndarray) -> np.ndarray:
        return _window_mean(rates[:, index], lead + settle).numpy()  # (b, n)

    names = list(states)
    mean = np.stack(
        [
            np.nan_to_num(
                present(responder, len(grid), make, states[s].trace(frames), reduce, batch_size, progress, f"state {s}")
            ).mean(0)
            for s in names
        ],
        1,
    )  # (n, states)
    col = {s: i for i, s in enumerate(names)}
    variables: Variables = {
        "state_response": (("neuron", "state"), mean),
        "state": (("state",), np.array(names)),
        "state_pupil_size": (("state",), np.array([states[s].pupil_size for s in names])),
        "state_speed": (("state",), np.array([states[s].speed for s in names])),
    }
    for gain, (hi, lo) in (("running_gain", ("running", "quiet")), ("pupil_gain", ("large_pupil", "small_pupil"))):
        if hi in col and lo in col:
            variables[gain] = (("neuron",), mean[:, col[hi]] / np.maximum(mean[:, col[lo]], 1e-12))
    return Result("behavior", responder.mouse_id, responder.unit_ids[index], variables, {"tf": tf})


# ------------------------------------------------------------------------------------------------ natural clips
def _constant(videos: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    return lambda idx: videos[idx]


def clip_responses(
    responder: Responder,
    videos: Sequence[np.ndarray],
    neurons: Sequence[int] | None = None,
    *,
    names: Sequence[str] | None = None,
    behaviors: Sequence[np.ndarray | None] | None = None,
    settle: int = 15,
    state: BehaviorState | str | None = None,
    progress: bool = False,
) -> Result:
    """Mean response of each neuron to each grey-level clip ``(T, H, W)`` (after ``settle`` frames), shown with its
    own ``behaviors`` trace ``(T, 2)`` where given, else ``state`` → the most and least activating clips."""
    canvas = canvas_of(responder)
    index = responder.neuron_index(neurons)
    names = list(names) if names is not None else [f"clip{i}" for i in range(len(videos))]
    default = _state(responder, state)

    def reduce(rates: torch.Tensor, idx: np.ndarray) -> np.ndarray:
        return _window_mean(rates[:, index], settle).numpy()  # (1, n)

    means = []
    for k in _track(range(len(videos)), progress, "clips"):
        video = np.asarray(videos[k], dtype=np.float32)
        given = behaviors[k] if behaviors is not None else None
        behavior = default.trace(len(video)) if given is None else np.asarray(given, dtype=np.float32)
        if len(video) <= settle:
            raise ValueError(f"clip {names[k]}: {len(video)} frames, need more than the {settle} settling frames")
        means.append(present(responder, 1, _constant(video[None]), behavior, reduce, canvas=canvas)[0])
    table = np.nan_to_num(np.stack(means, 1))  # (n, clips)
    return Result(
        "clips",
        responder.mouse_id,
        responder.unit_ids[index],
        {
            "clip_response": (("neuron", "clip"), table),
            "most_activating": (("neuron",), table.argmax(1)),
            "least_activating": (("neuron",), table.argmin(1)),
            "clip": (("clip",), np.array(names)),
        },
        {"settle": settle},
    )
