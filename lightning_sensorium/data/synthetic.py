"""Synthetic digital-twin mice written in the exact official SENSORIUM 2023 release layout.

``synthesize(out_dir, ...)`` writes one folder per mouse exactly as the release does (see
:mod:`lightning_sensorium.data.layout`) — time last, NaN padding to the mouse's longest trial, shuffled trial
order, all six tiers, per-frame statistics over train trials, the partially-NaN last frame that makes natural
trials 299 frames long through the official loader — plus the generator's ground truth *beside* the mice in
``out_dir/ground_truth/<session>/`` (noiseless rates, clip ids, stimulus types, neuron parameters).

Stimuli: natural-like movies (1/f amplitude spectrum, panning backgrounds, moving objects, scene cuts) for the
train / oracle / main tiers, and the five out-of-distribution families of the bonus tiers with the real trial
lengths. Behaviour: running bouts, slow pupil dynamics coupled to running, fixational drift with saccade-like
jumps of the pupil centre. Neurons: :mod:`lightning_sensorium.data.digital_twin`.

Everything streams clip by clip (all repeats of a clip are generated together, then written to their shuffled
file numbers), so memory is bounded by one clip's feature bank and the statistics accumulators.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lightning_sensorium.data import digital_twin as twin
from lightning_sensorium.data.layout import GROUND_TRUTH_DIR, OOD_STIMULUS_TYPES

H, W = twin.HEIGHT, twin.WIDTH
GREY = 128.0
#: Train trials kept for the per-frame median (a bounded reservoir: the first ones generated).
MEDIAN_RESERVOIR = 24


# -------------------------------------------------------------------------------------------------- stimuli
def _pink(rng: np.random.Generator, h: int, w: int, alpha: float = 1.0) -> np.ndarray:
    """Zero-mean, unit-std image with a 1/f^alpha amplitude spectrum."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f**alpha
    spectrum[0, 0] = 0.0
    img = np.fft.irfft2(spectrum, s=(h, w))
    return (img - img.mean()) / (img.std() + 1e-9)


def _to_grey(z: np.ndarray, mean: float = 80.0, std: float = 55.0) -> np.ndarray:
    return np.clip(np.round(mean + std * z), 0, 255)


def natural_movie(rng: np.random.Generator, length: int = 300) -> np.ndarray:
    """``(T, H, W)`` natural-like movie: panning 1/f scenes, a moving 1/f-textured object, scene cuts."""
    frames = np.empty((length, H, W))
    t = 0
    while t < length:
        seg = int(rng.integers(40, 121))
        bg = _pink(rng, 3 * H, 3 * W, alpha=rng.uniform(0.9, 1.3))
        obj = _pink(rng, H, H, alpha=1.0) * 1.3 + rng.normal(0, 0.8)
        radius = rng.uniform(5, 12)
        pos = np.array([rng.uniform(0, 2 * H), rng.uniform(0, 2 * W)])
        vel = rng.normal(0, 0.6, size=2)
        opos = np.array([rng.uniform(0, H), rng.uniform(0, W)])
        ovel = rng.normal(0, 1.2, size=2)
        yy, xx = np.mgrid[0:H, 0:W]
        oy, ox = np.mgrid[0:H, 0:H]
        for i in range(t, min(t + seg, length)):
            y0 = int(np.clip(round(pos[0]), 0, 2 * H))
            x0 = int(np.clip(round(pos[1]), 0, 2 * W))
            img = bg[y0 : y0 + H, x0 : x0 + W].copy()
            mask = (yy - opos[0]) ** 2 + (xx - opos[1]) ** 2 < radius**2
            iy = (yy[mask] - int(opos[0]) + H // 2) % H
            ix = (xx[mask] - int(opos[1]) + H // 2) % H
            img[mask] = obj[oy[iy, 0], ox[0, ix]]
            frames[i] = img
            pos += vel
            opos = (opos + ovel) % np.array([H, W])
        t += seg
    return _to_grey(frames)


def directional_pink_noise(rng: np.random.Generator, length: int) -> np.ndarray:
    """Pink noise drifting in a new direction every 27-frame block."""
    frames = np.empty((length, H, W))
    for b in range(0, length, 27):
        field = _pink(rng, 2 * H, 2 * W, alpha=1.0)
        theta = rng.uniform(0, 2 * math.pi)
        speed = rng.uniform(0.5, 1.5)
        for i in range(b, min(b + 27, length)):
            dy, dx = (i - b) * speed * math.sin(theta), (i - b) * speed * math.cos(theta)
            frames[i] = np.roll(field, (int(round(dy)), int(round(dx))), axis=(0, 1))[:H, :W]
    return _to_grey(frames, mean=GREY, std=45.0)


def gaussian_dots(rng: np.random.Generator, length: int) -> np.ndarray:
    """A bright or dark Gaussian dot at a new position every 9 frames, on grey."""
    frames = np.full((length, H, W), GREY)
    yy, xx = np.mgrid[0:H, 0:W]
    for b in range(0, length, 9):
        cy, cx = rng.uniform(4, H - 4), rng.uniform(4, W - 4)
        polarity = rng.choice([-1.0, 1.0])
        dot = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 4.0**2))
        frames[b : b + 9] = GREY + polarity * 120.0 * dot
    return np.clip(np.round(frames), 0, 255)


def random_dots(rng: np.random.Generator, length: int) -> np.ndarray:
    """Random dot kinematogram: 60-frame blocks, 8 directions, 2 coherences, 2 speeds."""
    frames = np.full((length, H, W), GREY)
    n_dots = 90
    for b in range(0, length, 60):
        theta = 2 * math.pi * int(rng.integers(8)) / 8
        coherence = float(rng.choice([0.5, 1.0]))
        speed = float(rng.choice([1.0, 2.0]))
        pos = rng.uniform([0, 0], [H, W], size=(n_dots, 2))
        polarity = rng.choice([0.0, 255.0], size=n_dots)
        for i in range(b, min(b + 60, length)):
            coherent = rng.random(n_dots) < coherence
            step = np.where(
                coherent[:, None],
                speed * np.array([math.sin(theta), math.cos(theta)]),
                rng.normal(0, speed, size=(n_dots, 2)),
            )
            pos = (pos + step) % np.array([H, W])
            iy, ix = pos[:, 0].astype(int) % H, pos[:, 1].astype(int) % W
            frames[i, iy, ix] = polarity
            frames[i, (iy + 1) % H, ix] = polarity
            frames[i, iy, (ix + 1) % W] = polarity
    return frames


def drifting_gabor(rng: np.random.Generator, length: int) -> np.ndarray:
    """Full-contrast Gabor patches drifting in one of 8 directions × 3 SF × 3 TF per 25-frame block."""
    frames = np.full((length, H, W), GREY)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    for b in range(0, length, 25):
        theta = 2 * math.pi * int(rng.integers(8)) / 8
        sf = float(rng.choice([0.04, 0.08, 0.16]))  # cycles / pixel
        tf = float(rng.choice([1.0, 2.0, 4.0])) / 30.0  # cycles / frame
        cy, cx = rng.uniform(8, H - 8), rng.uniform(12, W - 12)
        env = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 10.0**2))
        proj = (xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)
        for i in range(b, min(b + 25, length)):
            frames[i] = GREY + 127 * env * np.cos(2 * math.pi * (sf * proj - tf * (i - b)))
    return np.clip(np.round(frames), 0, 255)


def image_flashes(rng: np.random.Generator, length: int) -> np.ndarray:
    """Static natural-like images for 15 frames, each followed by 12–18 grey frames."""
    frames = np.full((length, H, W), GREY)
    t = 0
    while t < length:
        frames[t : t + 15] = _to_grey(_pink(rng, H, W, alpha=rng.uniform(0.9, 1.3)))
        t += 15 + int(rng.integers(12, 19))
    return frames


OOD_GENERATORS = {
    "pink_noise": directional_pink_noise,
    "gaussian_dots": gaussian_dots,
    "random_dots": random_dots,
    "drifting_gabor": drifting_gabor,
    "image": image_flashes,
}


def ood_length(rng: np.random.Generator, stimulus_type: str) -> int:
    """Trial lengths like the real bonus tiers (data-format.md §1)."""
    return {
        "pink_noise": int(rng.integers(313, 325)),
        "gaussian_dots": 315,
        "random_dots": 240,
        "drifting_gabor": 300,
        "image": int(rng.integers(305, 415)),
    }[stimulus_type]


# ------------------------------------------------------------------------------------------------ behaviour
def behaviour(rng: np.random.Generator, length: int) -> tuple[np.ndarray, np.ndarray]:
    """``behavior (T, 2)`` = [pupil size, running speed] and ``pupil_center (T, 2)`` = [x, y] in camera pixels."""
    running = np.zeros(length)
    state = rng.random() < 0.4
    target = 0.0
    speed = rng.uniform(0, 3) if state else 0.0
    for i in range(length):
        if state and rng.random() < 1 / 90:
            state = False
        elif not state and rng.random() < 1 / 150:
            state = True
            target = rng.lognormal(math.log(8.0), 0.5)
        goal = target if state else 0.0
        speed += (goal - speed) / 10.0 + rng.normal(0, 0.3) * state
        running[i] = max(speed, 0.0)
    pupil = np.empty(length)
    p = 45.0 + rng.normal(0, 6)
    for i in range(length):
        p += (45.0 + 0.8 * running[i] - p) / 60.0 + rng.normal(0, 0.6)
        pupil[i] = p
    center = np.empty((length, 2))
    c = np.array([140.0, 130.0]) + rng.normal(0, 4, size=2)
    for i in range(length):
        c += rng.normal(0, 0.08, size=2) + (np.array([140.0, 130.0]) - c) / 400.0
        if rng.random() < 1 / 60:  # saccade
            c += rng.normal(0, 4.0, size=2)
        center[i] = c
    return np.stack([np.maximum(pupil, 5.0), running], axis=1), center


# ------------------------------------------------------------------------------------------- trial planning
@dataclass(frozen=True)
class Clip:
    """One unique stimulus: its tier, family, length and the seed its pixels come from."""

    clip_id: int
    tier: str
    stimulus_type: str
    length: int
    seed: int


def plan_clips(rng: np.random.Generator, mouse: int, train_trials: int, clips_per_tier: int) -> list[Clip]:
    """The unique clips of one mouse; OOD families rotate across mice like the real release."""
    fam = list(OOD_STIMULUS_TYPES)
    live_bonus = [fam[mouse % 5]]
    final_bonus = [fam[(mouse + 1) % 5], fam[(mouse + 2) % 5]]
    clips: list[Clip] = []

    def add(tier: str, stimulus_type: str, length: int) -> None:
        clips.append(Clip(len(clips), tier, stimulus_type, length, int(rng.integers(2**31))))

    for _ in range(train_trials):
        add("train", "natural", 300)
    for tier in ("oracle", "live_test_main", "final_test_main"):
        for _ in range(clips_per_tier):
            add(tier, "natural", 300)
    for tier, families in (("live_test_bonus", live_bonus), ("final_test_bonus", final_bonus)):
        for family in families:
            for _ in range(clips_per_tier):
                add(tier, family, ood_length(rng, family))
    return clips


def render(clip: Clip) -> np.ndarray:
    """The pixels ``(T, H, W)`` of a clip, from its own seed (repeats are identical)."""
    rng = np.random.default_rng(clip.seed)
    if clip.stimulus_type == "natural":
        return natural_movie(rng, clip.length)
    return OOD_GENERATORS[clip.stimulus_type](rng, clip.length)


# ------------------------------------------------------------------------------------------------ statistics
class _FrameStats:
    """Streaming NaN-aware per-frame statistics over trials for one key (array shape ``(..., T_pad)``)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.n = np.zeros(shape)
        self.s = np.zeros(shape)
        self.ss = np.zeros(shape)
        self.lo = np.full(shape, np.inf)
        self.hi = np.full(shape, -np.inf)
        self.reservoir: list[np.ndarray] = []

    def add(self, x: np.ndarray) -> None:
        ok = ~np.isnan(x)
        v = np.where(ok, x, 0.0)
        self.n += ok
        self.s += v
        self.ss += v * v
        self.lo = np.where(ok, np.minimum(self.lo, v), self.lo)
        self.hi = np.where(ok, np.maximum(self.hi, v), self.hi)
        if len(self.reservoir) < MEDIAN_RESERVOIR:
            self.reservoir.append(x.astype(np.float32))

    def result(self) -> dict[str, np.ndarray]:
        with np.errstate(invalid="ignore", divide="ignore"):
            n = np.where(self.n > 0, self.n, np.nan)
            mean = self.s / n
            std = np.sqrt(np.maximum(self.ss / n - mean**2, 0.0))
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN frames → NaN, as in the release
            median = np.nanmedian(np.stack(self.reservoir), axis=0)
        return {
            "mean": mean.astype(np.float32),
            "std": std.astype(np.float32),
            "min": np.where(self.n > 0, self.lo, np.nan).astype(np.float32),
            "max": np.where(self.n > 0, self.hi, np.nan).astype(np.float32),
            "median": median.astype(np.float32),
        }


# --------------------------------------------------------------------------------------------------- writer
def session_name(seed: int, mouse: int) -> str:
    """Stable session folder name of synthetic mouse ``mouse`` (the ``mouse_id`` after conversion)."""
    return f"synthetic{seed}-{mouse}-Video-digitaltwin"


def _trial_plan(clips: list[Clip], repeats: int) -> list[tuple[Clip, int]]:
    return [(c, r) for c in clips for r in range(1 if c.tier == "train" else repeats)]


def _save(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def _neuron_meta(rng: np.random.Generator, neurons: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.sort(rng.choice(np.arange(1, int(neurons * 1.12) + 2), size=neurons, replace=False)).astype(np.int64)
    xy = rng.uniform(0, 1000, size=(neurons, 2))
    z = 200 + 25 * rng.integers(0, 10, size=neurons)
    coords = np.round(np.column_stack([xy, z])).astype(np.int64)
    return ids, coords


def _calibrate(params: twin.NeuronParameters, rng: np.random.Generator) -> None:
    """Scale each neuron so its mean rate on a calibration movie is its ``target_mean``."""
    movie = natural_movie(rng, 200)
    behavior, center = behaviour(rng, 200)
    d = twin.drive(twin.feature_bank(movie), params, center) * twin.behaviour_gain(params, behavior)
    params.scale = params.target_mean / (d.mean(0) + 1e-6)


def _iter_trials(
    clips: list[Clip], repeats: int, params: twin.NeuronParameters, rng: np.random.Generator
) -> Iterator[tuple[Clip, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(clip, video, behavior, pupil_center, rates, responses)`` time-first, clip by clip."""
    for clip in clips:
        video = render(clip)
        bank = twin.feature_bank(video)
        for _ in range(1 if clip.tier == "train" else repeats):
            behavior, center = behaviour(rng, clip.length)
            d = twin.drive(bank, params, center) * twin.behaviour_gain(params, behavior)
            rate = params.baseline + params.scale * d
            trace = twin.calcium(rate)
            rates = twin.sample_8hz_upsample(trace, None)
            responses = twin.sample_8hz_upsample(trace, rng)
            yield clip, video, behavior, center, rates, responses


def _write_mouse(  # noqa: C901 - one pass over trials
    root: Path,
    k: int,
    *,
    neurons: int,
    train_trials: int,
    clips_per_tier: int,
    repeats: int,
    seed: int,
    hide_test: bool,
    progress: Any = None,
) -> Path:
    """Write mouse ``k`` (session folder + ground truth), atomically. ``progress``: a queue that gets 1 per trial."""
    name = session_name(seed, k)
    final, gt_final = root / name, root / GROUND_TRUTH_DIR / name
    for p in (final, gt_final):
        if p.exists():
            raise FileExistsError(f"{p} already exists; choose another OUT_DIR or remove it")
    tmp, gt_tmp = root / f".{name}.tmp", root / GROUND_TRUTH_DIR / f".{name}.tmp"
    for p in (tmp, gt_tmp):
        shutil.rmtree(p, ignore_errors=True)

    rng = np.random.default_rng([seed, k])
    clips = plan_clips(rng, k, train_trials, clips_per_tier)
    plan = _trial_plan(clips, repeats)
    order = rng.permutation(len(plan))  # plan position -> file number
    t_pad = max(c.length for c in clips)
    unit_ids, coords = _neuron_meta(rng, neurons)
    params = twin.draw_neurons(rng, coords)
    _calibrate(params, np.random.default_rng([seed, k, 1]))

    for key in ("videos", "responses", "behavior", "pupil_center"):
        (tmp / "data" / key).mkdir(parents=True)
    (gt_tmp / "rates").mkdir(parents=True)
    stats = {
        "videos": _FrameStats((H, W, t_pad)),
        "responses": _FrameStats((neurons, t_pad)),
        "behavior": _FrameStats((2, t_pad)),
        "pupil_center": _FrameStats((2, t_pad)),
    }
    tiers = np.empty(len(plan), dtype="<U16")
    clip_ids = np.empty(len(plan), dtype=np.int64)
    types = np.empty(len(plan), dtype="<U16")
    noise_rng = np.random.default_rng([seed, k, 2])
    for pos, (clip, video, behavior, center, rates, responses) in enumerate(
        _iter_trials(clips, repeats, params, noise_rng)
    ):
        i = int(order[pos])
        length = clip.length
        v = np.full((H, W, t_pad), np.nan, dtype=np.float32)
        v[:, :, :length] = video.transpose(1, 2, 0)  # (T, H, W) -> (H, W, T)
        # The release's last valid frame is partially NaN: the official loader keeps length - 1 frames.
        v[: H // 3, :, length - 1] = np.nan
        r = np.full((neurons, t_pad), np.nan, dtype=np.float32)
        r[:, :length] = responses.T
        gt = np.full((neurons, t_pad), np.nan, dtype=np.float32)
        gt[:, :length] = rates.T
        pc = np.full((2, t_pad), np.nan, dtype=np.float32)
        pc[:, :length] = center.T
        # Behaviour is never NaN: the recording goes on past the stimulus.
        b_full = (
            behavior.T
            if length == t_pad
            else np.concatenate(
                [behavior.T, behaviour(np.random.default_rng([seed, k, 3, i]), t_pad - length)[0].T], axis=1
            )
        )
        b = b_full.astype(np.float32)
        if hide_test and clip.tier.startswith(("live_test", "final_test")):
            r = np.zeros((neurons, t_pad), dtype=np.float32)
        if clip.tier == "train":
            for key, arr in (("videos", v), ("responses", r), ("behavior", b), ("pupil_center", pc)):
                stats[key].add(arr)
        for key, arr in (("videos", v), ("responses", r), ("behavior", b), ("pupil_center", pc)):
            _save(tmp / "data" / key / f"{i}.npy", arr)
        _save(gt_tmp / "rates" / f"{i}.npy", gt)
        tiers[i], clip_ids[i], types[i] = clip.tier, clip.clip_id, clip.stimulus_type
        if progress is not None:
            progress.put(1)

    meta = tmp / "meta"
    (meta / "trials").mkdir(parents=True)
    (meta / "neurons").mkdir(parents=True)
    _save(meta / "trials" / "tiers.npy", tiers)
    _save(meta / "neurons" / "unit_ids.npy", unit_ids)
    _save(meta / "neurons" / "cell_motor_coordinates.npy", coords)
    for key, acc in stats.items():
        d = meta / "statistics" / key / "all"
        d.mkdir(parents=True)
        for stat, arr in acc.result().items():
            _save(d / f"{stat}.npy", arr)
    (tmp / "config.json").write_text(json.dumps({"links": {}}))
    _save(gt_tmp / "clip_ids.npy", clip_ids)
    _save(gt_tmp / "stimulus_types.npy", types)
    (gt_tmp / "neurons").mkdir()
    for pname, arr in params.as_arrays().items():  # .npy, not .npz: zip members carry timestamps
        _save(gt_tmp / "neurons" / f"{pname}.npy", arr)
    os.replace(gt_tmp, gt_final)
    os.replace(tmp, final)
    return final


def synthesize(
    out_dir: str | Path,
    *,
    mice: int = 3,
    neurons: int = 1000,
    train_trials: int = 200,
    clips_per_tier: int = 6,
    repeats: int = 10,
    seed: int = 0,
    hide_test: bool = False,
    progress: bool = True,
    workers: int | None = None,
) -> list[Path]:
    """Write ``mice`` synthetic mice into ``out_dir`` (official layout) and their ground truth beside them.

    Returns the session folders. Same arguments, same bytes (whatever ``workers``, the number of processes; default:
    one per core). Raises FileExistsError if a session exists.
    """
    for name, value in (("mice", mice), ("neurons", neurons), ("train_trials", train_trials)):
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be ≥ 1, got {value}")
    if clips_per_tier < 1 or repeats < 1:
        raise ValueError(f"--clips-per-tier and --repeats must be ≥ 1, got {clips_per_tier} and {repeats}")
    root = Path(out_dir)
    (root / GROUND_TRUTH_DIR).mkdir(parents=True, exist_ok=True)
    for k in range(mice):
        if (root / session_name(seed, k)).exists():
            raise FileExistsError(f"{root / session_name(seed, k)} already exists; choose another OUT_DIR or remove it")
    kwargs: dict[str, Any] = {
        "neurons": neurons,
        "train_trials": train_trials,
        "clips_per_tier": clips_per_tier,
        "repeats": repeats,
        "seed": seed,
        "hide_test": hide_test,
    }
    workers = min(mice, workers or os.cpu_count() or 1)
    per_mouse = len(_trial_plan(plan_clips(np.random.default_rng(0), 0, train_trials, clips_per_tier), repeats))
    if workers == 1 and not progress:
        return [_write_mouse(root, k, **kwargs) for k in range(mice)]
    import multiprocessing as mp

    from rich.progress import Progress

    # Mice are independent (each has its own seeds), so they are written in parallel processes; "spawn"
    # because forking after torch has started its thread pool can deadlock.
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
        queue = manager.Queue() if progress else None
        futures = [pool.submit(_write_mouse, root, k, progress=queue, **kwargs) for k in range(mice)]
        if queue is not None:
            with Progress() as bar:
                task = bar.add_task(f"synthesising {mice} mice", total=mice * per_mouse)
                while not all(f.done() for f in futures):
                    while not queue.empty():
                        bar.update(task, advance=queue.get())
                    time.sleep(0.1)
                bar.update(task, completed=mice * per_mouse)
        return [f.result() for f in futures]


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def tree_digest(root: str | Path) -> str:
    """SHA-256 over every file path and content under ``root`` (for same-seed-same-bytes checks)."""
    h = hashlib.sha256()
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()
