"""Official SENSORIUM 2023 release → one zarr v3 store per mouse (``<out>/<mouse_id>.zarr``).

Sources are session folders, the release's ``.zip`` archives (read member by member, never extracted), or a
folder holding several of them. Everything is validated before anything is written, each mouse is written
trial by trial into ``<out>/.<mouse_id>.zarr.tmp-<pid>`` and renamed into place only when complete, and a
re-run on an unchanged source is a no-op. The store contract is in the README ("Store contract").

Rules (data-format.md §1, §6):

* valid length = first frame where *any* element of *any* key is NaN (the official ``CutVideos``), also where the
  official per-frame statistics are NaN (normalisation would make it NaN), capped at 300 frames;
* hidden test responses (all zeros) are flagged in ``hidden`` and do not cut the length;
* repeats (``clip_id``) are found by content: two trials show the same clip when their 6×8-pixel block means differ
  by ≤ 1 grey level in > 85 % of the frames (ViV1T's rule, https://github.com/bryanlimy/ViV1T-closed-loop/blob/
  main/misc/assign_video_ids.py, applied to block means) — the release has no clip ids;
* OOD stimulus type of bonus trials by pixel statistics (:func:`classify_stimulus`);
* the official per-frame statistics are kept (time first); per-neuron response statistics are computed from
  the valid frames of the train trials, raw and after the official normalisation.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from lightning_sensorium.data.layout import (
    DATA_KEYS,
    GROUND_TRUTH_DIR,
    MAX_FRAMES,
    STIMULUS_TYPES,
    TIERS,
)

#: Bump when the store layout changes; stores of another version are rebuilt only with ``overwrite``.
FORMAT_VERSION = 2
STATS = ("mean", "std", "min", "max", "median")
#: Small arrays are compressed; the big per-trial arrays (videos, responses, rates) are stored raw, one chunk per
#: trial, time first: a window is then one contiguous byte range that MouseStore memory-maps (BENCHMARKS.md: lz4
#: chunks of 50 frames read 3× slower than the official .npy files; raw trial chunks read faster, and uint8
#: videos keep the store smaller than the release).
_COMPRESSOR = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")


class ConversionError(ValueError):
    """Bad input to ``convert``: the message names the file or field and what was expected."""


# ------------------------------------------------------------------------------------------------- sources
class _Session:
    """Read access to one session: a folder, or a folder inside a .zip archive."""

    def __init__(self, name: str, folder: Path | None = None, archive: Path | None = None, prefix: str = "") -> None:
        self.name, self.folder, self.archive, self.prefix = name, folder, archive, prefix
        self._zip: zipfile.ZipFile | None = None

    @property
    def where(self) -> str:
        return str(self.folder) if self.folder else f"{self.archive}:{self.prefix}"

    def _zf(self) -> zipfile.ZipFile:
        if self._zip is None:
            assert self.archive is not None
            self._zip = zipfile.ZipFile(self.archive)
        return self._zip

    def listdir(self, rel: str) -> list[str] | None:
        """File names directly inside ``rel`` (None if the folder does not exist)."""
        if self.folder is not None:
            d = self.folder / rel
            return sorted(p.name for p in d.iterdir() if p.is_file()) if d.is_dir() else None
        base = f"{self.prefix}{rel}/"
        names = [n[len(base) :] for n in self._zf().namelist() if n.startswith(base) and "__MACOSX" not in n]
        if not names:
            return None
        return sorted(n for n in names if n and "/" not in n)

    def exists(self, rel: str) -> bool:
        if self.folder is not None:
            return (self.folder / rel).is_file()
        return f"{self.prefix}{rel}" in set(self._zf().namelist())

    def load(self, rel: str) -> np.ndarray:
        """``np.load`` a member without pickles; a corrupt file raises ConversionError naming it."""
        try:
            if self.folder is not None:
                return np.load(self.folder / rel, allow_pickle=False)
            with self._zf().open(f"{self.prefix}{rel}") as f:
                return np.load(io.BytesIO(f.read()), allow_pickle=False)
        except FileNotFoundError as err:
            raise ConversionError(f"{self.where}/{rel}: missing file") from err
        except KeyError as err:
            raise ConversionError(f"{self.where}/{rel}: missing file") from err
        except (ValueError, OSError, EOFError) as err:
            raise ConversionError(f"{self.where}/{rel}: not a readable .npy file ({err})") from err

    def size(self, rel: str) -> int:
        if self.folder is not None:
            return (self.folder / rel).stat().st_size
        return self._zf().getinfo(f"{self.prefix}{rel}").file_size

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None


def _is_session_folder(p: Path) -> bool:
    return (p / "data").is_dir() or (p / "meta").is_dir()


def find_sessions(sources: Sequence[str | Path]) -> list[_Session]:
    """Session folders, sessions inside .zip archives, or the sessions inside folders of them."""
    sessions: list[_Session] = []
    for src in map(Path, sources):
        if not src.exists():
            raise ConversionError(f"{src}: no such file or folder")
        if src.is_file() and src.suffix == ".zip":
            sessions.extend(_zip_sessions(src))
        elif src.is_dir() and _is_session_folder(src):
            sessions.append(_Session(src.name, folder=src))
        elif src.is_dir():
            inner = [p for p in sorted(src.iterdir()) if p.name != GROUND_TRUTH_DIR and not p.name.startswith(".")]
            found = [_Session(p.name, folder=p) for p in inner if p.is_dir() and _is_session_folder(p)]
            for z in (p for p in inner if p.suffix == ".zip"):
                found.extend(_zip_sessions(z))
            if not found:
                raise ConversionError(f"{src}: neither a session folder (data/, meta/) nor a folder of sessions")
            sessions.extend(found)
        else:
            raise ConversionError(f"{src}: expected a session folder, a .zip archive or a folder of sessions")
    names = [s.name for s in sessions]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConversionError(f"session(s) {dup} given more than once")
    return sessions


def _zip_sessions(path: Path) -> list[_Session]:
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if "__MACOSX" not in n]
    except zipfile.BadZipFile as err:
        raise ConversionError(f"{path}: not a readable .zip archive ({err})") from err
    prefixes = sorted({n.split("meta/trials/tiers.npy")[0] for n in names if n.endswith("meta/trials/tiers.npy")})
    if not prefixes:
        raise ConversionError(f"{path}: no session (meta/trials/tiers.npy) inside the archive")
    return [_Session(PurePosixPath(p).name or path.stem, archive=path, prefix=p) for p in prefixes]


# ------------------------------------------------------------------------------------------------ validation
@dataclass
class _Plan:
    """What a validated session holds."""

    tiers: np.ndarray  # (n,) str
    unit_ids: np.ndarray
    coordinates: np.ndarray
    statistics: dict[str, dict[str, np.ndarray]]  # official, time last
    t_pad: int
    stat_limit: int  # first frame where an official mean/std is NaN
    fingerprint: str


def _validate(session: _Session) -> _Plan:  # noqa: C901 - one linear list of checks
    where = session.where
    if session.listdir("meta/trials") is None or not session.exists("meta/trials/tiers.npy"):
        raise ConversionError(f"{where}/meta/trials/tiers.npy: missing file")
    tiers = session.load("meta/trials/tiers.npy").astype(str)
    if tiers.ndim != 1:
        raise ConversionError(f"{where}/meta/trials/tiers.npy: expected a 1-D array, got shape {tiers.shape}")
    unknown = sorted(set(tiers.tolist()) - set(TIERS) - {"none"})
    if unknown:
        raise ConversionError(f"{where}/meta/trials/tiers.npy: unknown tier(s) {unknown}; expected {list(TIERS)}")
    n = len(tiers)
    for key in DATA_KEYS:
        files = session.listdir(f"data/{key}")
        if files is None:
            raise ConversionError(f"{where}/data/{key}: missing folder")
        if len(files) != n:
            raise ConversionError(
                f"{where}/data/{key}: {len(files)} files, but meta/trials/tiers.npy lists {n} trials "
                "(every data/<key> must hold one <i>.npy per trial and nothing else)"
            )
        expected = {f"{i}.npy" for i in range(n)}
        if set(files) != expected:
            odd = sorted(set(files) - expected)[:3]
            raise ConversionError(f"{where}/data/{key}: unexpected file(s) {odd}; expected 0.npy … {n - 1}.npy")
    unit_ids = session.load("meta/neurons/unit_ids.npy")
    coords = session.load("meta/neurons/cell_motor_coordinates.npy")
    if unit_ids.ndim != 1 or coords.shape != (unit_ids.shape[0], 3):
        raise ConversionError(
            f"{where}/meta/neurons: unit_ids {unit_ids.shape} and cell_motor_coordinates {coords.shape} "
            "must be (N,) and (N, 3)"
        )
    statistics = {
        key: {stat: session.load(f"meta/statistics/{key}/all/{stat}.npy") for stat in STATS} for key in DATA_KEYS
    }
    t_pad = int(statistics["responses"]["mean"].shape[-1])
    expected_shapes = {
        "videos": None,  # (H, W, T_pad); H, W taken from the data
        "responses": (unit_ids.shape[0], t_pad),
        "behavior": (2, t_pad),
        "pupil_center": (2, t_pad),
    }
    for key, want in expected_shapes.items():
        for stat, arr in statistics[key].items():
            if (want is not None and arr.shape != want) or arr.shape[-1] != t_pad:
                raise ConversionError(
                    f"{where}/meta/statistics/{key}/all/{stat}.npy: shape {arr.shape}, expected {want or '(H, W, T)'}"
                    f" with T = {t_pad}"
                )
    stat_nan = np.zeros(t_pad, dtype=bool)
    for key in DATA_KEYS:
        for stat in ("mean", "std"):
            a = statistics[key][stat]
            stat_nan |= np.isnan(a.reshape(-1, t_pad)).all(axis=0)
    stat_limit = int(np.argmax(stat_nan)) if stat_nan.any() else t_pad
    h = hashlib.sha256()
    h.update(tiers.astype("<U32").tobytes())
    h.update(unit_ids.tobytes())
    for key in DATA_KEYS:
        for i in range(n):
            h.update(f"{key}/{i}:{session.size(f'data/{key}/{i}.npy')}".encode())
        h.update(statistics[key]["std"].tobytes())
    return _Plan(tiers, unit_ids, coords, statistics, t_pad, stat_limit, h.hexdigest()[:32])


# ----------------------------------------------------------------------------------------------- heuristics
def block_signature(video: np.ndarray) -> np.ndarray:
    """``(T, 48)`` means of 6×8 blocks of each frame of a ``(T, 36, 64)`` clip (clip identity by content)."""
    t, h, w = video.shape
    return video.reshape(t, 6, h // 6, 8, w // 8).mean(axis=(2, 4)).reshape(t, 48)


def same_clip(a: np.ndarray, b: np.ndarray, tolerance: float = 1.0, min_fraction: float = 0.85) -> bool:
    """ViV1T's rule on block signatures: ≤ ``tolerance`` grey levels apart in > ``min_fraction`` of the frames."""
    if a.shape != b.shape:
        return False
    return bool((np.abs(a - b).max(axis=1) <= tolerance).mean() > min_fraction)


def classify_stimulus(video: np.ndarray) -> str:
    """OOD family of a bonus trial ``(T, H, W)`` in grey levels, from pixel statistics (documented heuristic).

    In order: many uniform grey frames → ``image`` (flashed images with grey gaps); near-binary dots on grey →
    ``random_dots``; frames held still for most steps → ``gaussian_dots`` (9-frame flashes); a large grey
    surround that changes every frame → ``drifting_gabor``; otherwise full-field moving texture → ``pink_noise``.
    """
    t = video.shape[0]
    flat = video.reshape(t, -1)
    grey_frames = (flat.std(axis=1) < 2.0).mean()
    if grey_frames > 0.15:
        return "image"
    median = np.median(flat, axis=1, keepdims=True)
    near_background = (np.abs(flat - median) <= 3).mean()
    extreme = ((flat <= 5) | (flat >= 250)).mean()
    if extreme > 0.01 and near_background > 0.8:
        return "random_dots"
    still = (np.abs(np.diff(flat, axis=0)).mean(axis=1) < 0.5).mean() if t > 1 else 1.0
    if still > 0.6:
        return "gaussian_dots"
    if near_background > 0.3:
        return "drifting_gabor"
    return "pink_noise"


def valid_length(arrays: dict[str, np.ndarray], hidden: bool, limit: int) -> int:
    """First frame where any element of any key is NaN (arrays time last), capped at ``limit``."""
    length = limit
    for key, arr in arrays.items():
        if key == "responses" and hidden:
            continue
        nan_frames = np.isnan(arr.reshape(-1, arr.shape[-1])).any(axis=0)
        if nan_frames.any():
            length = min(length, int(np.argmax(nan_frames)))
    return length


# ---------------------------------------------------------------------------------------------------- write
def _create(
    group: zarr.Group,
    name: str,
    shape: tuple[int, ...],
    dtype: Any,
    chunks: tuple[int, ...],
    dims: list[str],
    raw: bool = False,
    **attrs: Any,
) -> zarr.Array:
    arr = group.create_array(
        name,
        shape=shape,
        dtype=dtype,
        chunks=chunks,
        compressors=None if raw else _COMPRESSOR,
        dimension_names=dims,
        fill_value=0,
    )
    if attrs:
        arr.attrs.update(attrs)
    return arr


def _categorical(group: zarr.Group, name: str, values: np.ndarray, labels: Sequence[str]) -> None:
    codes = np.array([labels.index(v) for v in values], dtype=np.int8)
    arr = _create(group, name, codes.shape, np.int8, codes.shape, ["trial"])
    arr[:] = codes
    # CF conventions, which xarray understands: code k means labels[k].
    arr.attrs.update({"flag_values": list(range(len(labels))), "flag_meanings": " ".join(labels)})


def _write_store(session: _Session, plan: _Plan, dest: Path, progress: Any, ground_truth: Path | None) -> None:  # noqa: C901 - one pass over trials
    n, t_pad, n_neurons = len(plan.tiers), plan.t_pad, plan.unit_ids.shape[0]
    limit = min(plan.stat_limit, MAX_FRAMES)
    first = session.load("data/videos/0.npy")
    if first.ndim != 3 or first.shape[2] != t_pad:
        raise ConversionError(f"{session.where}/data/videos/0.npy: shape {first.shape}, expected (H, W, {t_pad})")
    height, width = first.shape[:2]
    finite = first[~np.isnan(first)]
    integral = bool(finite.size and np.all(finite == np.round(finite)) and finite.min() >= 0 and finite.max() <= 255)
    video_dtype = np.uint8 if integral else np.float32

    root = zarr.open_group(dest, mode="w", zarr_format=3)
    videos = _create(
        root,
        "videos",
        (n, t_pad, height, width),
        video_dtype,
        (1, t_pad, height, width),
        ["trial", "frame", "height", "width"],
        raw=True,
    )
    responses = _create(
        root,
        "responses",
        (n, t_pad, n_neurons),
        np.float32,
        (1, t_pad, n_neurons),
        ["trial", "frame", "neuron"],
        raw=True,
    )
    behavior = np.zeros((n, t_pad, 2), dtype=np.float32)
    pupil = np.zeros((n, t_pad, 2), dtype=np.float32)
    lengths = np.zeros(n, dtype=np.int32)
    hidden = np.zeros(n, dtype=bool)
    signatures: list[np.ndarray] = []
    types: list[str] = []
    precision = _precision(plan.statistics["responses"]["std"])  # (N, T_pad)
    sums = {k: np.zeros((3, n_neurons)) for k in ("raw", "normalized")}  # count, sum, sum of squares

    rates = None
    if ground_truth is not None:
        gt = root.create_group("ground_truth")
        rates = _create(
            gt,
            "rates",
            (n, t_pad, n_neurons),
            np.float32,
            (1, t_pad, n_neurons),
            ["trial", "frame", "neuron"],
            raw=True,
        )

    shapes = {
        "videos": (height, width, t_pad),
        "responses": (n_neurons, t_pad),
        "behavior": (2, t_pad),
        "pupil_center": (2, t_pad),
    }
    for i in range(n):
        arrays = {key: session.load(f"data/{key}/{i}.npy") for key in DATA_KEYS}
        for key, arr in arrays.items():
            if arr.shape != shapes[key]:
                raise ConversionError(f"{session.where}/data/{key}/{i}.npy: shape {arr.shape}, expected {shapes[key]}")
        if np.isnan(arrays["behavior"]).any():
            raise ConversionError(f"{session.where}/data/behavior/{i}.npy: NaN in behaviour (the release has none)")
        hidden[i] = not np.any(np.nan_to_num(arrays["responses"]))
        lengths[i] = valid_length(arrays, bool(hidden[i]), limit)
        v = np.nan_to_num(arrays["videos"]).transpose(2, 0, 1)  # (H, W, T) -> (T, H, W)
        if integral and not np.all(v == np.round(v)):
            raise ConversionError(
                f"{session.where}/data/videos/{i}.npy: not integer grey levels, unlike 0.npy; the store keeps uint8"
            )
        videos[i] = v.astype(video_dtype)
        r = np.nan_to_num(arrays["responses"]).T  # (N, T) -> (T, N)
        responses[i] = r
        behavior[i] = arrays["behavior"].T
        pupil[i] = np.nan_to_num(arrays["pupil_center"]).T
        valid = v[: lengths[i]]
        signatures.append(block_signature(valid.astype(np.float32)))
        tier = str(plan.tiers[i])
        types.append(classify_stimulus(valid) if tier.endswith("bonus") else "natural")
        if tier == "train" and not hidden[i]:
            x = r[: lengths[i]].astype(np.float64)
            xn = x * precision[:, : lengths[i]].T
            for key, val in (("raw", x), ("normalized", xn)):
                sums[key] += np.stack([np.full(n_neurons, len(val)), val.sum(0), (val**2).sum(0)])
        if rates is not None and ground_truth is not None:
            rates[i] = np.nan_to_num(np.load(ground_truth / "rates" / f"{i}.npy")).T
        if progress is not None:
            progress()

    clip_id = _group_clips(signatures)
    for name, arr, dims in (
        ("behavior", behavior, ["trial", "frame", "signal"]),
        ("pupil_center", pupil, ["trial", "frame", "coordinate"]),
    ):
        _create(root, name, arr.shape, np.float32, arr.shape, dims)[:] = arr
    for name, arr in (
        ("length", lengths),
        ("clip_id", clip_id),
        ("trial_index", np.arange(n, dtype=np.int32)),
        ("hidden", hidden),
    ):
        _create(root, name, arr.shape, arr.dtype, arr.shape, ["trial"])[:] = arr
    _categorical(root, "tier", plan.tiers, list(TIERS) + ["none"])
    _categorical(root, "stimulus_type", np.array(types), list(STIMULUS_TYPES))
    _create(root, "unit_ids", plan.unit_ids.shape, plan.unit_ids.dtype, plan.unit_ids.shape, ["neuron"])[:] = (
        plan.unit_ids
    )
    _create(
        root, "coordinates", plan.coordinates.shape, plan.coordinates.dtype, plan.coordinates.shape, ["neuron", "axis"]
    )[:] = plan.coordinates

    stats = root.create_group("statistics")
    stat_dims = {
        "videos": ["frame", "height", "width"],
        "responses": ["frame", "neuron"],
        "behavior": ["frame", "signal"],
        "pupil_center": ["frame", "coordinate"],
    }
    for key in DATA_KEYS:
        g = stats.create_group(key)
        for stat, arr in plan.statistics[key].items():
            a = np.moveaxis(arr.astype(np.float32), -1, 0)  # time first
            _create(g, stat, a.shape, np.float32, a.shape, stat_dims[key])[:] = a
    per_neuron = stats.create_group("responses_per_neuron")
    for key, (count, s, ss) in sums.items():
        g = per_neuron.create_group(key)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = s / count
            std = np.sqrt(np.maximum(ss / count - mean**2, 0))
        for stat, arr in (("mean", mean), ("std", std)):
            _create(g, stat, arr.shape, np.float32, arr.shape, ["neuron"])[:] = np.nan_to_num(arr).astype(np.float32)

    if ground_truth is not None:
        gt_group = root["ground_truth"]
        assert isinstance(gt_group, zarr.Group)
        ids = np.load(ground_truth / "clip_ids.npy")
        _create(gt_group, "clip_id", ids.shape, np.int64, ids.shape, ["trial"])[:] = ids
        _categorical(
            gt, "stimulus_type", np.load(ground_truth / "stimulus_types.npy").astype(str), list(STIMULUS_TYPES)
        )

    root.attrs.update(
        {
            "session": session.name,
            "mouse_id": session.name,
            "num_neurons": int(n_neurons),
            "num_trials": int(n),
            "t_pad": int(t_pad),
            "height": int(height),
            "width": int(width),
            "format_version": FORMAT_VERSION,
            "source": session.where,
            "source_fingerprint": plan.fingerprint,
            "has_ground_truth": ground_truth is not None,
        }
    )


def _precision(std: np.ndarray) -> np.ndarray:
    from lightning_sensorium.data.normalization import response_precision

    return response_precision(std)


def _group_clips(signatures: list[np.ndarray]) -> np.ndarray:
    """Clip id per trial: trials whose signatures match (``same_clip``) share the id of the first of them."""
    ids = np.full(len(signatures), -1, dtype=np.int64)
    reps: list[int] = []  # representative trial of each group
    summary = np.stack([s.mean(axis=0) if len(s) else np.zeros(48) for s in signatures])  # (n, 48)
    for i, sig in enumerate(signatures):
        candidates = [g for g, r in enumerate(reps) if np.abs(summary[r] - summary[i]).max() <= 2.0]
        match = next((g for g in candidates if same_clip(signatures[reps[g]], sig)), None)
        if match is None:
            reps.append(i)
            match = len(reps) - 1
        ids[i] = match
    return ids


def _ground_truth_dir(session: _Session) -> Path | None:
    if session.folder is None:
        return None
    gt = session.folder.parent / GROUND_TRUTH_DIR / session.name
    return gt if (gt / "rates").is_dir() else None


def _existing_fingerprint(path: Path) -> tuple[int, str] | None:
    try:
        attrs: dict[str, Any] = dict(zarr.open_group(path, mode="r").attrs)
        return int(attrs["format_version"]), str(attrs["source_fingerprint"])
    except Exception:  # noqa: BLE001 - anything unreadable is "not ours"
        return None


def convert(
    sources: Sequence[str | Path], out_dir: str | Path, *, overwrite: bool = False, progress: bool = True
) -> list[Path]:
    """Convert release sessions to ``out_dir/<mouse_id>.zarr`` stores; returns the store paths.

    Raises ConversionError (a ValueError) on bad input; nothing half-written is left in ``out_dir``.
    """
    sessions = find_sessions(sources)
    if not sessions:
        raise ConversionError("no session given")
    plans = [_validate(s) for s in sessions]  # everything is checked before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    todo: list[tuple[_Session, _Plan, Path]] = []
    results: list[Path] = []
    for session, plan in zip(sessions, plans, strict=True):
        dest = out / f"{session.name}.zarr"
        results.append(dest)
        if dest.exists():
            existing = _existing_fingerprint(dest)
            if existing == (FORMAT_VERSION, plan.fingerprint):
                print(f"{dest}: up to date")
                continue
            if not overwrite:
                raise ConversionError(
                    f"{dest}: output already exists and was built from another source or version; "
                    "pass --overwrite to replace it"
                )
        todo.append((session, plan, dest))

    bar_ctx: Any = contextlib.nullcontext()
    if progress and todo:
        from rich.progress import Progress

        bar_ctx = Progress()
    with bar_ctx as bar:
        for session, plan, dest in todo:
            tmp = out / f".{dest.name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tick = None
            if bar is not None:
                task = bar.add_task(f"convert {session.name}", total=len(plan.tiers))
                tick = lambda task=task: bar.update(task, advance=1)  # noqa: E731
            try:
                _write_store(session, plan, tmp, tick, _ground_truth_dir(session))
                if dest.exists():
                    trash = out / f".{dest.name}.old-{os.getpid()}"
                    os.replace(dest, trash)
                    os.replace(tmp, dest)
                    shutil.rmtree(trash)
                else:
                    os.replace(tmp, dest)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            finally:
                session.close()
    return results


def iter_store_paths(root: str | Path) -> Iterator[Path]:
    """The ``*.zarr`` stores directly under ``root``."""
    yield from sorted(p for p in Path(root).glob("*.zarr") if p.is_dir())
