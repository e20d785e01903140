"""Synthetic digital-twin mice written in the exact official SENSORIUM 2023 release layout.

``synthesize(out_dir, ...)`` writes one folder per mouse as the release does, so the real ``convert`` → ``fit`` →
``evaluate`` path runs on them where the real data cannot be downloaded, and puts the generator's ground truth
beside them. Stimuli and behaviour come from :mod:`.stimuli`, neurons from :mod:`.digital_twin`. What is written
and how it streams (bytes independent of the number of workers): docs/data.md, "Synthetic digital-twin mice
(`synth`)".
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_sensorium.atomic import place, remove, temporary_sibling
from lightning_sensorium.data import digital_twin as twin
from lightning_sensorium.data.layout import DATA_KEYS, GROUND_TRUTH_DIR, OOD_STIMULUS_TYPES, STATISTICS, TEST_TIERS
from lightning_sensorium.data.stimuli import (
    OOD_GENERATORS,
    H,
    MouseBehaviour,
    W,
    behaviour,
    natural_movie,
    ood_length,
)

#: Train clips whose trials form the reservoir of the per-frame median.
MEDIAN_RESERVOIR = 16
#: Shards per mouse (the unit of parallel work); fixed so the output does not depend on the worker count.
SHARDS_PER_MOUSE = 4


# ------------------------------------------------------------------------------------------- trial planning
@dataclass(frozen=True)
class Clip:
    """One unique stimulus: its id (unique within the mouse), tier, family, length and pixel seed."""

    clip_id: int
    tier: str
    stimulus_type: str
    length: int
    seed: int


def plan_clips(rng: np.random.Generator, mouse: int, train_trials: int, clips_per_tier: int) -> list[Clip]:
    """The unique clips of one mouse; OOD families rotate across mice like the real release.

    Mouse k sees family k mod 5 in ``live_test_bonus`` and the next two in ``final_test_bonus`` — the same
    (live; final) combinations as real mice A, E, C, B, D.
    """
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
    """NaN-aware running sums over trials for one key (arrays ``(..., T_pad)``); mergeable across shards."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.n = np.zeros(shape, dtype=np.int32)
        self.s = np.zeros(shape)
        self.ss = np.zeros(shape)
        self.lo = np.full(shape, np.inf, dtype=np.float32)
        self.hi = np.full(shape, -np.inf, dtype=np.float32)

    def add(self, x: np.ndarray) -> None:
        ok = ~np.isnan(x)
        v = np.where(ok, x.astype(np.float64), 0.0)
        self.n += ok
        self.s += v
        self.ss += v * v
        np.fmin(self.lo, x, out=self.lo)  # fmin/fmax ignore NaN
        np.fmax(self.hi, x, out=self.hi)

    def merge(self, other: _FrameStats) -> None:
        self.n += other.n
        self.s += other.s
        self.ss += other.ss
        np.minimum(self.lo, other.lo, out=self.lo)
        np.maximum(self.hi, other.hi, out=self.hi)

    def result(self) -> dict[str, np.ndarray]:
        """Per-frame mean, std (ddof 0), min, max; NaN where no trial has a value (beyond the train trials)."""
        seen = self.n > 0
        n = np.where(seen, self.n, 1)
        mean = self.s / n
        std = np.sqrt(np.maximum(self.ss / n - mean**2, 0.0))
        nan = np.float32(np.nan)
        return {
            "mean": np.where(seen, mean, nan).astype(np.float32),
            "std": np.where(seen, std, nan).astype(np.float32),
            "min": np.where(seen, self.lo, nan).astype(np.float32),
            "max": np.where(seen, self.hi, nan).astype(np.float32),
        }


def _median(files: list[Path], chunk_elements: int = 1 << 23) -> np.ndarray:
    """NaN-aware median over trial files (same shape), read in chunks of the first axis to bound memory."""
    arrays = [np.load(f, mmap_mode="r") for f in files]
    shape = arrays[0].shape
    per_row = max(1, len(files) * int(np.prod(shape[1:])))
    rows = max(1, chunk_elements // per_row)
    out = np.empty(shape, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN frames → NaN, as in the release
        for r in range(0, shape[0], rows):
            out[r : r + rows] = np.nanmedian(np.stack([a[r : r + rows] for a in arrays]), axis=0)
    return out


# --------------------------------------------------------------------------------------------------- writer
def session_name(seed: int, mouse: int) -> str:
    """Stable session folder name of synthetic mouse ``mouse`` (the ``mouse_id`` after conversion)."""
    return f"synthetic{seed}-{mouse}-Video-digitaltwin"


@dataclass
class _Mouse:
    """Everything a shard worker needs to write its trials of one mouse (picklable)."""

    index: int
    seed: int
    name: str
    tmp: Path
    gt_tmp: Path
    clips: list[Clip]
    first_pos: np.ndarray  # (n_clips,) plan position of each clip's first repeat
    order: np.ndarray  # plan position → file number
    repeats: int
    t_pad: int
    unit_ids: np.ndarray
    coords: np.ndarray
    params: twin.NeuronParameters
    behaviour: MouseBehaviour
    hide_test: bool

    def n_repeats(self, clip: Clip) -> int:
        return 1 if clip.tier == "train" else self.repeats

    @property
    def n_trials(self) -> int:
        return len(self.order)

    def shard(self, s: int) -> list[Clip]:
        return self.clips[s::SHARDS_PER_MOUSE]

    def file_of(self, clip: Clip, repeat: int) -> int:
        return int(self.order[self.first_pos[clip.clip_id] + repeat])


def neuron_metadata(rng: np.random.Generator, neurons: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted, 1-based, non-contiguous unit ids and integer cortical coordinates (µm) on 10 planes."""
    ids = np.sort(rng.choice(np.arange(1, int(neurons * 1.1) + 3), size=neurons, replace=False)).astype(np.int64)
    origin = rng.uniform(0, 400, size=2)
    xy = origin + rng.uniform(0, 630, size=(neurons, 2))
    z = 200 + 25 * rng.integers(0, 10, size=neurons)
    return ids, np.round(np.column_stack([xy, z])).astype(np.int64)


def _setup_mouse(
    root: Path,
    k: int,
    *,
    neurons: int,
    train_trials: int,
    clips_per_tier: int,
    repeats: int,
    seed: int,
    hide_test: bool,
) -> _Mouse:
    """Plan one mouse, draw and calibrate its neurons, create its temporary folders."""
    name = session_name(seed, k)
    rng = np.random.default_rng([seed, k])
    clips = plan_clips(rng, k, train_trials, clips_per_tier)
    counts = np.array([1 if c.tier == "train" else repeats for c in clips])
    first_pos = np.concatenate([[0], np.cumsum(counts)[:-1]])
    order = rng.permutation(int(counts.sum()))
    unit_ids, coords = neuron_metadata(rng, neurons)
    mb = MouseBehaviour.draw(rng)
    params = twin.draw_neurons(rng, coords, np.asarray(mb.eye_reference), np.array([mb.pupil_mean, 12.0]))
    cal = np.random.default_rng([seed, k, 1])
    twin.calibrate(params, [natural_movie(cal, 300) for _ in range(2)])
    tmp, gt_tmp = temporary_sibling(root / name), temporary_sibling(root / GROUND_TRUTH_DIR / name)
    for key in DATA_KEYS:
        (tmp / "data" / key).mkdir(parents=True)
    (gt_tmp / "rates").mkdir(parents=True)
    return _Mouse(
        index=k,
        seed=seed,
        name=name,
        tmp=tmp,
        gt_tmp=gt_tmp,
        clips=clips,
        first_pos=first_pos,
        order=order,
        repeats=repeats,
        t_pad=max(c.length for c in clips),
        unit_ids=unit_ids,
        coords=coords,
        params=params,
        behaviour=mb,
        hide_test=hide_test,
    )


def _padded(x: np.ndarray, t_pad: int) -> np.ndarray:
    """``x (..., L)`` → float32 ``(..., t_pad)`` with NaN after L."""
    out = np.full((*x.shape[:-1], t_pad), np.nan, dtype=np.float32)
    out[..., : x.shape[-1]] = x
    return out


def _trials(mouse: _Mouse, clip: Clip) -> Iterator[tuple[int, dict[str, np.ndarray], np.ndarray]]:
    """``(file number, release arrays (time last, padded), noiseless rates)`` for every repeat of ``clip``."""
    video = render(clip)  # (L, H, W)
    bank = twin.feature_bank(video)
    length, t_pad, n = clip.length, mouse.t_pad, len(mouse.unit_ids)
    v = _padded(video.transpose(1, 2, 0), t_pad)  # (H, W, T_pad)
    v[: H // 3, :, length - 1] = np.nan  # the release's last valid frame is partially NaN
    for r in range(mouse.n_repeats(clip)):
        rng = np.random.default_rng([mouse.seed, mouse.index, 2, clip.clip_id, r])
        behavior, center = behaviour(rng, t_pad, mouse.behaviour)  # (T_pad, 2) each, never NaN
        rate = twin.step_rates(bank, mouse.params, behavior[:length], center[:length])
        rates, responses = twin.observe(rate, mouse.params, length, rng)  # (N, L) each
        hidden = mouse.hide_test and clip.tier in TEST_TIERS
        arrays = {
            "videos": v,
            "responses": np.zeros((n, t_pad), dtype=np.float32) if hidden else _padded(responses, t_pad),
            "behavior": behavior.T.astype(np.float32),  # recorded beyond the stimulus: no NaN
            "pupil_center": _padded(center[:length].T, t_pad),
        }
        yield mouse.file_of(clip, r), arrays, _padded(rates, t_pad)


def _stat_shapes(mouse: _Mouse) -> dict[str, tuple[int, ...]]:
    n, t = len(mouse.unit_ids), mouse.t_pad
    return {"videos": (H, W, t), "responses": (n, t), "behavior": (2, t), "pupil_center": (2, t)}


def _write_shard(mouse: _Mouse, shard: int, progress: Any = None) -> dict[str, _FrameStats]:
    """Write every trial of shard ``shard`` of ``mouse``; return its train-trial sums. ``progress``: ``put(1)``."""
    stats = {key: _FrameStats(shape) for key, shape in _stat_shapes(mouse).items()}
    for clip in mouse.shard(shard):
        for i, arrays, rates in _trials(mouse, clip):
            for key, arr in arrays.items():
                np.save(mouse.tmp / "data" / key / f"{i}.npy", arr)
                if clip.tier == "train":
                    stats[key].add(arr)
            np.save(mouse.gt_tmp / "rates" / f"{i}.npy", rates)
            if progress is not None:
                progress.put(1)
    return stats


def _finish_mouse(mouse: _Mouse, stats: dict[str, _FrameStats], root: Path) -> Path:
    """Write meta, statistics and ground-truth tables, then move both folders into place."""
    tmp, gt_tmp = mouse.tmp, mouse.gt_tmp
    tiers = np.empty(mouse.n_trials, dtype="<U16")
    clip_ids = np.empty(mouse.n_trials, dtype=np.int64)
    types = np.empty(mouse.n_trials, dtype="<U16")
    for clip in mouse.clips:
        for r in range(mouse.n_repeats(clip)):
            i = mouse.file_of(clip, r)
            tiers[i], clip_ids[i], types[i] = clip.tier, clip.clip_id, clip.stimulus_type
    meta = tmp / "meta"
    (meta / "trials").mkdir(parents=True)
    (meta / "neurons").mkdir(parents=True)
    np.save(meta / "trials" / "tiers.npy", tiers)
    np.save(meta / "neurons" / "unit_ids.npy", mouse.unit_ids)
    np.save(meta / "neurons" / "cell_motor_coordinates.npy", mouse.coords)
    reservoir = [mouse.file_of(c, 0) for c in mouse.clips if c.tier == "train"][:MEDIAN_RESERVOIR]
    for key, acc in stats.items():
        d = meta / "statistics" / key / "all"
        d.mkdir(parents=True)
        result = acc.result()
        result["median"] = _median([tmp / "data" / key / f"{i}.npy" for i in reservoir])
        for stat in STATISTICS:
            np.save(d / f"{stat}.npy", result[stat])
    (tmp / "config.json").write_text(json.dumps({"links": {}}))
    np.save(gt_tmp / "clip_ids.npy", clip_ids)
    np.save(gt_tmp / "stimulus_types.npy", types)
    (gt_tmp / "neurons").mkdir()
    for pname, arr in mouse.params.as_arrays().items():  # .npy, not .npz: zip members carry timestamps
        np.save(gt_tmp / "neurons" / f"{pname}.npy", arr)
    place(gt_tmp, root / GROUND_TRUTH_DIR / mouse.name, overwrite=False)
    return place(tmp, root / mouse.name, overwrite=False)


def ground_truth_mice(release: str | Path) -> list[str]:
    """The mice of a synthetic release that have ground-truth neurons."""
    gt = Path(release) / GROUND_TRUTH_DIR
    if not gt.is_dir():
        raise FileNotFoundError(
            f"{release}: no {GROUND_TRUTH_DIR}/ folder, no ground-truth neurons (not a synthetic release)"
        )
    return sorted(p.name for p in gt.iterdir() if p.is_dir() and (p / "neurons").is_dir())


def load_neuron_parameters(release: str | Path, mouse_id: str) -> twin.NeuronParameters:
    """The ground-truth neurons of ``mouse_id`` as :func:`_finish_mouse` saved them
    (``<release>/ground_truth/<mouse_id>/neurons/<field>.npy``)."""
    folder = Path(release) / GROUND_TRUTH_DIR / mouse_id / "neurons"
    if not folder.is_dir():
        raise ValueError(f"mouse {mouse_id}: no ground truth in {release}; its mice are {ground_truth_mice(release)}")
    fields = [f.name for f in dataclasses.fields(twin.NeuronParameters)]
    for name in fields:
        if not (folder / f"{name}.npy").is_file():
            raise FileNotFoundError(f"{folder / (name + '.npy')}: missing ground-truth field {name}")
    return twin.NeuronParameters(**{name: np.load(folder / f"{name}.npy") for name in fields})


class _InOrderMerge:
    """Merge shard sums in shard order (floating-point sums depend on the order), holding early arrivals only."""

    def __init__(self) -> None:
        self.total: dict[str, _FrameStats] | None = None
        self.next = 0
        self.early: dict[int, dict[str, _FrameStats]] = {}

    def add(self, shard: int, part: dict[str, _FrameStats]) -> bool:
        """Add shard ``shard``; True once all shards are in."""
        self.early[shard] = part
        while self.next in self.early:
            part = self.early.pop(self.next)
            if self.total is None:
                self.total = part
            else:
                for key, acc in self.total.items():
                    acc.merge(part[key])
            self.next += 1
        return self.next == SHARDS_PER_MOUSE


class _Ticker:
    """Queue-like ``put(n)`` that advances a progress bar in this process."""

    def __init__(self, advance: Callable[[int], None]) -> None:
        self.put = advance


@contextlib.contextmanager
def _progress(show: bool, total: int, label: str) -> Iterator[Callable[[int], None] | None]:
    """A rich progress bar's ``advance(n)``, or None when not shown."""
    if not show:
        yield None
        return
    from rich.progress import Progress

    with Progress() as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.update(task, advance=n)


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

    Returns the session folders. ``workers``: processes (default: one per core, or none for tiny jobs); the bytes
    written do not depend on it. Raises FileExistsError if a session (or its ground truth) already exists.
    """
    root = Path(out_dir)
    _check_options(
        root,
        mice=mice,
        neurons=neurons,
        train_trials=train_trials,
        clips_per_tier=clips_per_tier,
        repeats=repeats,
        seed=seed,
    )
    (root / GROUND_TRUTH_DIR).mkdir(parents=True, exist_ok=True)
    options = {"neurons": neurons, "train_trials": train_trials, "clips_per_tier": clips_per_tier}
    setups: list[_Mouse] = []
    try:
        with _torch_threads(1):
            for k in range(mice):
                setups.append(_setup_mouse(root, k, repeats=repeats, seed=seed, hide_test=hide_test, **options))
            total = sum(m.n_trials for m in setups)
            if workers is None:
                workers = 1 if total * neurons < 400_000 else (os.cpu_count() or 1)
            workers = max(1, min(workers, mice * SHARDS_PER_MOUSE))
            with _progress(progress, total, f"synthesising {mice} mice") as advance:
                if workers > 1:
                    return _run_parallel(setups, workers, advance, root)
                return _run_serial(setups, advance, root)
    except BaseException:
        for m in setups:
            remove(m.tmp)
            remove(m.gt_tmp)
        raise


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Use ``n`` torch intra-op threads inside the block and restore the caller's setting afterwards.

    The generator's tensors are small: with 2 threads on 2 busy cores, torch's thread synchronisation made the
    tiny test release 4× slower (15.6 s vs 3.8 s), so synthesis runs single-threaded and parallelises by process.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_options(
    root: Path, *, mice: int, neurons: int, train_trials: int, clips_per_tier: int, repeats: int, seed: int
) -> None:
    """Fail early on bad sizes and on sessions (or ground truth) that already exist."""
    for name, value in (("mice", mice), ("neurons", neurons), ("train_trials", train_trials)):
        if value < 1:
            raise ValueError(f"{name} must be ≥ 1, got {value}")
    if clips_per_tier < 1 or repeats < 1:
        raise ValueError(f"clips_per_tier and repeats must be ≥ 1, got {clips_per_tier} and {repeats}")
    for k in range(mice):
        for p in (root / session_name(seed, k), root / GROUND_TRUTH_DIR / session_name(seed, k)):
            if p.exists():
                raise FileExistsError(f"{p} already exists; choose another OUT_DIR or remove it")


def _run_serial(setups: list[_Mouse], advance: Callable[[int], None] | None, root: Path) -> list[Path]:
    """Write every mouse in this process, shard after shard."""
    sessions = []
    for m in setups:
        merge = _InOrderMerge()
        for s in range(SHARDS_PER_MOUSE):
            merge.add(s, _write_shard(m, s, None if advance is None else _Ticker(advance)))
        assert merge.total is not None
        sessions.append(_finish_mouse(m, merge.total, root))
    return sessions


def _run_parallel(setups: list[_Mouse], workers: int, advance: Callable[[int], None] | None, root: Path) -> list[Path]:
    """Run all (mouse, shard) tasks in ``workers`` processes; finish each mouse as soon as its shards are in."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # forking after torch has started its thread pool can deadlock
    manager = ctx.Manager() if advance is not None else None
    queue = manager.Queue() if manager is not None else None
    merges = [_InOrderMerge() for _ in setups]
    done: dict[int, Path] = {}
    try:
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
            futures: dict[Future[dict[str, _FrameStats]], tuple[int, int]] = {}
            for k, m in enumerate(setups):
                for s in range(SHARDS_PER_MOUSE):
                    futures[pool.submit(_write_shard, m, s, queue)] = (k, s)
            pending = set(futures)
            try:
                while pending:
                    finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                    _drain(queue, advance)
                    for fut in finished:
                        k, s = futures.pop(fut)
                        if merges[k].add(s, fut.result()):
                            done[k] = _finish_mouse(setups[k], merges[k].total, root)  # type: ignore[arg-type]
                            merges[k] = _InOrderMerge()  # free the sums
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # don't run the queued shards of a failed job
                raise
            _drain(queue, advance)
    finally:
        if manager is not None:
            manager.shutdown()
    return [done[k] for k in range(len(setups))]


def _drain(queue: Any, advance: Callable[[int], None] | None) -> None:
    if queue is None or advance is None:
        return
    n = 0
    while not queue.empty():
        n += queue.get()
    if n:
        advance(n)


def _init_worker() -> None:
    # Runs in the spawned worker processes only: each owns one core, more intra-op threads would oversubscribe.
    torch.set_num_threads(1)
