"""Official SENSORIUM 2023 release → one zarr v3 store per mouse (``<out>/<mouse_id>.zarr``).

Sources are session folders, the release's ``.zip`` archives (read member by member, never extracted; ``__MACOSX/``
ignored), or folders holding several of them; ``mouse_id`` is the session folder name. Everything that can be
checked without reading the big arrays (folders, file counts, every ``.npy`` header and size, the metadata, the
behaviour files) is checked before anything is written; each mouse is then written trial by trial into
``<out>/.<mouse_id>.zarr.tmp-<pid>`` and renamed into place only when complete. A re-run on an unchanged source is
a no-op. The store contract is in the README ("Store contract").

Rules (data-format.md §1, §6):

* ``length`` = the official ``CutVideos(max_frame=None)`` cut: the first frame where any element of any key is NaN,
  or where the per-frame statistics end (NaN: no train trial has that frame, :func:`statistics_limit`), capped at
  ``MAX_FRAMES`` (300). Hidden test responses (all zeros) are flagged in ``hidden``; zeros are not NaN, so they do
  not cut.
* frames ≥ ``length`` are stored as 0 (the store holds no NaN);
* ``clip_id``: trials showing the same clip share an id, found by content with ViV1T's tolerance (two clips are
  equal when every pixel is within 1 grey level in more than 85 % of the frames; :func:`group_clips`);
* ``stimulus_type``: natural for train/oracle/main tiers; bonus trials by a pixel-statistics heuristic
  (:func:`classify_stimulus`), then by majority within each clip group;
* the official per-frame statistics are kept (time first); per-neuron response statistics (mean, std over the valid
  frames of the non-hidden train trials, raw and after the official scaling) are accumulated while streaming.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from lightning_sensorium.data.layout import DATA_KEYS, GROUND_TRUTH_DIR, MAX_FRAMES, STIMULUS_TYPES, TIERS

#: Bump when the store layout or a derived field changes; older stores are rebuilt only with ``overwrite``.
FORMAT_VERSION = 3
STATS = ("mean", "std", "min", "max", "median")
#: Tier codes of the store (``none`` is skipped by every loader; kept so such trials stay addressable).
TIER_LABELS = (*TIERS, "none")
#: Two trials show the same clip when every pixel is within ``CLIP_TOLERANCE`` grey levels in more than
#: ``CLIP_MIN_FRACTION`` of the frames (ViV1T's rule: https://github.com/bryanlimy/ViV1T-closed-loop/blob/main/misc/
#: assign_video_ids.py).
CLIP_TOLERANCE = 1.0
CLIP_MIN_FRACTION = 0.85
#: Frames are summarised by the means of 6 × 8 blocks for the clip search (a necessary condition of the rule).
BLOCKS = (6, 8)
#: Small arrays are compressed. The big per-trial arrays (videos, responses, rates) are stored raw, one chunk per
#: trial, time first, so that a window is one contiguous byte range (BENCHMARKS.md: Blosc compresses the sparse
#: responses 1.4–2.2× but decoding costs more than the disk reads it saves, and ~1.0× on tiny-negative noise).
_COMPRESSOR = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
_EXPECTED_SHAPES = {  # time last, as in the release (for error messages)
    "videos": "(H, W, T_pad)",
    "responses": "(N, T_pad)",
    "behavior": "(2, T_pad)",
    "pupil_center": "(2, T_pad)",
}


class ConversionError(ValueError):
    """Bad input to ``convert``: the message names the file or field and what was expected."""


# ------------------------------------------------------------------------------------------------- sources
class _Session:
    """Read access to one session: a folder, or a folder inside a .zip archive (members read, never extracted)."""

    def __init__(self, name: str, *, folder: Path | None = None, archive: Path | None = None, prefix: str = "") -> None:
        self.name, self.folder, self.archive, self.prefix = name, folder, archive, prefix
        self._zip: zipfile.ZipFile | None = None
        self._members: dict[str, zipfile.ZipInfo] = {}

    @property
    def where(self) -> str:
        return str(self.folder) if self.folder is not None else f"{self.archive}:{self.prefix.rstrip('/')}"

    def _zf(self) -> zipfile.ZipFile:
        if self._zip is None:
            assert self.archive is not None
            self._zip = zipfile.ZipFile(self.archive)
            self._members = {
                info.filename[len(self.prefix) :]: info
                for info in self._zip.infolist()
                if info.filename.startswith(self.prefix) and "__MACOSX" not in info.filename and not info.is_dir()
            }
        return self._zip

    def listdir(self, rel: str) -> list[str] | None:
        """Names directly inside ``rel``, hidden ones excepted as ``glob("*")`` does (None if no such folder)."""
        if self.folder is not None:
            d = self.folder / rel
            return sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else None
        self._zf()
        base = f"{rel}/"
        names = {n[len(base) :].split("/")[0] for n in self._members if n.startswith(base)}
        return sorted(n for n in names if not n.startswith(".")) if names else None

    def exists(self, rel: str) -> bool:
        if self.folder is not None:
            return (self.folder / rel).is_file()
        self._zf()
        return rel in self._members

    def _open(self, rel: str) -> IO[bytes]:
        if self.folder is not None:
            return open(self.folder / rel, "rb")  # noqa: SIM115 - returned to a with-statement
        return self._zf().open(self._members[rel])

    def size(self, rel: str) -> int:
        if self.folder is not None:
            return (self.folder / rel).stat().st_size
        self._zf()
        return self._members[rel].file_size

    def load(self, rel: str) -> np.ndarray:
        """``np.load`` a member without pickles; a missing or corrupt file raises ConversionError naming it."""
        try:
            if self.folder is not None:
                return np.load(self.folder / rel, allow_pickle=False)
            with self._open(rel) as f:
                return np.load(io.BytesIO(f.read()), allow_pickle=False)
        except (FileNotFoundError, KeyError) as err:
            raise ConversionError(f"{self.where}/{rel}: missing file") from err
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
            raise ConversionError(f"{self.where}/{rel}: not a readable .npy file ({err})") from err

    def header(self, rel: str) -> tuple[tuple[int, ...], np.dtype]:
        """Shape and dtype from the ``.npy`` header; checks the file size against them (truncated files)."""
        try:
            with self._open(rel) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f".npy format version {version} is not supported")
                offset = f.tell()
        except (FileNotFoundError, KeyError) as err:
            raise ConversionError(f"{self.where}/{rel}: missing file") from err
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
            raise ConversionError(f"{self.where}/{rel}: not a readable .npy file ({err})") from err
        if dtype.hasobject:
            raise ConversionError(f"{self.where}/{rel}: object array (needs pickle); expected a numeric array")
        expected = offset + int(np.prod(shape)) * dtype.itemsize
        if self.size(rel) != expected:
            raise ConversionError(
                f"{self.where}/{rel}: not a readable .npy file ({self.size(rel)} bytes, header promises {expected})"
            )
        return tuple(int(s) for s in shape), dtype

    def inventory(self) -> list[str]:
        """One line per file under ``data/`` and ``meta/``: path, size and mtime (folders) or CRC-32 (archives)."""
        if self.folder is not None:
            lines = []
            for top in ("data", "meta"):
                for dirpath, _, files in os.walk(self.folder / top):
                    for f in files:
                        st = os.stat(os.path.join(dirpath, f))
                        rel = os.path.relpath(os.path.join(dirpath, f), self.folder)
                        lines.append(f"{rel} {st.st_size} {st.st_mtime_ns}")
            return sorted(lines)
        self._zf()
        return sorted(
            f"{rel} {info.file_size} crc{info.CRC}"
            for rel, info in self._members.items()
            if rel.startswith(("data/", "meta/"))
        )

    def ground_truth_dir(self) -> Path | None:
        """``<parent of the session>/ground_truth/<session>/`` if it exists (synthetic mice only)."""
        source = self.folder if self.folder is not None else self.archive
        assert source is not None
        parent = source.parent
        gt = parent / GROUND_TRUTH_DIR / self.name
        return gt if gt.is_dir() else None

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
            for z in (p for p in inner if p.is_file() and p.suffix == ".zip"):
                found.extend(_zip_sessions(z))
            if not found:
                raise ConversionError(
                    f"{src}: neither a session folder (with data/ and meta/) nor a folder of sessions or .zip archives"
                )
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
    marker = "meta/trials/tiers.npy"
    prefixes = sorted({n[: -len(marker)] for n in names if n.endswith(marker)})
    if not prefixes:
        raise ConversionError(f"{path}: no session inside the archive (no {marker})")
    return [_Session(PurePosixPath(p).name or path.stem, archive=path, prefix=p) for p in prefixes]


# ------------------------------------------------------------------------------------------------ validation
@dataclass
class _Plan:
    """A validated session."""

    tiers: np.ndarray  # (n,) str
    unit_ids: np.ndarray  # (N,)
    coordinates: np.ndarray  # (N, 3)
    statistics: dict[str, dict[str, np.ndarray]]  # official, time last
    t_pad: int
    height: int
    width: int
    ground_truth: Path | None

    @property
    def num_trials(self) -> int:
        return len(self.tiers)

    @property
    def num_neurons(self) -> int:
        return int(self.unit_ids.shape[0])


def _fingerprint(session: _Session) -> str:
    """Cheap identity of a source: every file's path, size and mtime (folders) or CRC-32 (archives)."""
    h = hashlib.sha256(f"format {FORMAT_VERSION}\n".encode())
    for line in session.inventory():
        h.update(line.encode() + b"\n")
    return h.hexdigest()[:32]


def _validate(session: _Session) -> _Plan:  # noqa: C901 - one linear list of checks
    where = session.where
    if session.listdir("data") is None and session.listdir("meta") is None:
        raise ConversionError(f"{where}: missing folders data/ and meta/ (not a session)")
    tiers_raw = session.load("meta/trials/tiers.npy")
    if tiers_raw.ndim != 1 or tiers_raw.dtype.kind not in "US":
        raise ConversionError(
            f"{where}/meta/trials/tiers.npy: shape {tiers_raw.shape} dtype {tiers_raw.dtype}, expected (n_trials,) str"
        )
    tiers = tiers_raw.astype(str)
    unknown = sorted(set(tiers.tolist()) - set(TIER_LABELS))
    if unknown:
        raise ConversionError(f"{where}/meta/trials/tiers.npy: unknown tier(s) {unknown}; expected {list(TIERS)}")
    n = len(tiers)
    if n == 0:
        raise ConversionError(f"{where}/meta/trials/tiers.npy: no trials")
    expected_files = [f"{i}.npy" for i in range(n)]
    for key in DATA_KEYS:
        files = session.listdir(f"data/{key}")
        if files is None:
            raise ConversionError(f"{where}/data/{key}: missing folder")
        if len(files) != n:
            raise ConversionError(
                f"{where}/data/{key}: {len(files)} files, but meta/trials/tiers.npy lists {n} trials "
                "(every data/<key> must hold exactly 0.npy … <n-1>.npy)"
            )
        odd = sorted(set(files) - set(expected_files))
        if odd:
            raise ConversionError(f"{where}/data/{key}: unexpected file(s) {odd[:3]}; expected 0.npy … {n - 1}.npy")
    unit_ids = session.load("meta/neurons/unit_ids.npy")
    coords = session.load("meta/neurons/cell_motor_coordinates.npy")
    if unit_ids.ndim != 1 or unit_ids.dtype.kind not in "iu":
        raise ConversionError(
            f"{where}/meta/neurons/unit_ids.npy: shape {unit_ids.shape} dtype {unit_ids.dtype}, expected (N,) int"
        )
    num_neurons = unit_ids.shape[0]
    if coords.shape != (num_neurons, 3):
        raise ConversionError(
            f"{where}/meta/neurons/cell_motor_coordinates.npy: shape {coords.shape}, expected ({num_neurons}, 3)"
        )
    first, _ = session.header("data/videos/0.npy")
    if len(first) != 3:
        raise ConversionError(f"{where}/data/videos/0.npy: shape {first}, expected (H, W, T_pad)")
    height, width, t_pad = first
    shapes = {
        "videos": (height, width, t_pad),
        "responses": (num_neurons, t_pad),
        "behavior": (2, t_pad),
        "pupil_center": (2, t_pad),
    }
    statistics: dict[str, dict[str, np.ndarray]] = {}
    for key in DATA_KEYS:
        statistics[key] = {}
        for stat in STATS:
            rel = f"meta/statistics/{key}/all/{stat}.npy"
            arr = session.load(rel)
            if arr.shape != shapes[key]:
                raise ConversionError(
                    f"{where}/{rel}: shape {arr.shape}, expected {shapes[key]} {_EXPECTED_SHAPES[key]}"
                )
            statistics[key][stat] = arr
    for key in DATA_KEYS:
        for i in range(n):
            rel = f"data/{key}/{i}.npy"
            shape, dtype = session.header(rel)
            if shape != shapes[key]:
                raise ConversionError(
                    f"{where}/{rel}: shape {shape}, expected {shapes[key]} {_EXPECTED_SHAPES[key]} "
                    f"(N from meta/neurons/unit_ids.npy, H, W, T_pad from data/videos/0.npy)"
                )
            if dtype.kind not in "fiu":
                raise ConversionError(f"{where}/{rel}: dtype {dtype}, expected a numeric array")
    for i in range(n):  # the release's behaviour has no NaN; NaN here would silently cut trials
        behavior = session.load(f"data/behavior/{i}.npy")
        if np.isnan(behavior).any():
            frame = int(np.argmax(np.isnan(behavior).any(axis=0)))
            raise ConversionError(
                f"{where}/data/behavior/{i}.npy: NaN in behaviour (first at frame {frame}); the release has none"
            )
    gt = session.ground_truth_dir()
    if gt is not None:
        _validate_ground_truth(gt, n, (num_neurons, t_pad))
    return _Plan(tiers, unit_ids, coords, statistics, t_pad, height, width, gt)


def _validate_ground_truth(gt: Path, n: int, rate_shape: tuple[int, int]) -> None:
    def load(rel: str) -> np.ndarray:
        try:
            return np.load(gt / rel, allow_pickle=False)
        except FileNotFoundError as err:
            raise ConversionError(f"{gt}/{rel}: missing file") from err
        except (ValueError, OSError, EOFError) as err:
            raise ConversionError(f"{gt}/{rel}: not a readable .npy file ({err})") from err

    ids, types = load("clip_ids.npy"), load("stimulus_types.npy")
    if ids.shape != (n,) or types.shape != (n,):
        raise ConversionError(f"{gt}: clip_ids {ids.shape} and stimulus_types {types.shape}, expected ({n},)")
    bad = sorted(set(types.astype(str).tolist()) - set(STIMULUS_TYPES))
    if bad:
        raise ConversionError(f"{gt}/stimulus_types.npy: unknown type(s) {bad}; expected {list(STIMULUS_TYPES)}")
    files = sorted(p.name for p in (gt / "rates").iterdir()) if (gt / "rates").is_dir() else []
    if sorted(files) != sorted(f"{i}.npy" for i in range(n)):
        raise ConversionError(f"{gt}/rates: {len(files)} files, expected 0.npy … {n - 1}.npy")
    shape = np.load(gt / "rates" / "0.npy", mmap_mode="r").shape
    if shape != rate_shape:
        raise ConversionError(f"{gt}/rates/0.npy: shape {shape}, expected {rate_shape} (N, T_pad)")


# ---------------------------------------------------------------------------------------- official length
def statistics_limit(statistics: dict[str, dict[str, np.ndarray]], max_frames: int = MAX_FRAMES) -> int:
    """First frame without statistics (a used statistic NaN for every element), capped at ``max_frames``.

    neuralpredictors' ``NeuroNormalizer`` (https://github.com/sinzlab/neuralpredictors/blob/main/neuralpredictors/
    data/transforms.py): videos ``(x - mean) / std``, behaviour ``x * (1 / std)``, pupil centre ``(x - mean) / std``
    propagate NaN statistics; responses ``x * precision`` do not (a NaN std takes the ``1 / (0.01·nanmean(std))``
    branch). The statistics are NaN where no train trial has frames (≥ 300 in the release): those frames are cut.
    A statistic NaN for only *some* elements of a frame does not cut (the official loader would): that happens when
    every train trial has NaN at the same pixels — the synthetic release's partially NaN last frame (299) does
    this, while real long trials come out of the official loader with 300 frames (data-format.md §1).
    """
    used = [
        statistics["videos"]["mean"],
        statistics["videos"]["std"],
        statistics["behavior"]["std"],
        statistics["pupil_center"]["mean"],
        statistics["pupil_center"]["std"],
    ]
    limit = max_frames
    for a in used:
        empty = np.isnan(a.reshape(-1, a.shape[-1])).all(axis=0)
        if empty.any():
            limit = min(limit, int(np.argmax(empty)))
    return limit


def valid_length(arrays: dict[str, np.ndarray], limit: int) -> int:
    """The official ``CutVideos(max_frame=None)`` length: first frame where any element of any key (time last) is
    NaN, at most ``limit`` (:func:`statistics_limit`).

    Unlike the official loader, a zero std (behaviour ``0 * inf``, a video pixel equal to its mean ``0 / 0``) does not
    cut: that is an artefact of the normaliser (data-format.md §6.4), which our own normaliser avoids.
    """
    length = limit
    for x in arrays.values():
        nan = np.isnan(x.reshape(-1, x.shape[-1])[:, :length]).any(axis=0)
        if nan.any():
            length = int(np.argmax(nan))
    return length


def official_precision(std: np.ndarray) -> np.ndarray:
    """``NeuroNormalizer``'s response precision from the per-frame std (any shape): never NaN."""
    threshold = 0.01 * np.nanmean(std)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(std > threshold, 1.0 / std, 1.0 / threshold)


# ----------------------------------------------------------------------------------------------- heuristics
def block_means(video: np.ndarray) -> np.ndarray:
    """``(T, 48)`` means of 6 × 8 blocks of each frame of a ``(T, H, W)`` clip (H, W divisible by 6, 8 or not)."""
    t, h, w = video.shape
    by, bx = BLOCKS
    ys = np.linspace(0, h, by + 1).astype(int)
    xs = np.linspace(0, w, bx + 1).astype(int)
    v = video.astype(np.float32)
    if h % by == 0 and w % bx == 0:
        return v.reshape(t, by, h // by, bx, w // bx).mean(axis=(2, 4)).reshape(t, by * bx)
    out = np.empty((t, by, bx), np.float32)
    for a in range(by):
        for b in range(bx):
            out[:, a, b] = v[:, ys[a] : ys[a + 1], xs[b] : xs[b + 1]].mean(axis=(1, 2))
    return out.reshape(t, by * bx)


def same_clip(
    a: np.ndarray, b: np.ndarray, tolerance: float = CLIP_TOLERANCE, min_fraction: float = CLIP_MIN_FRACTION
) -> bool:
    """ViV1T's rule on two ``(T, H, W)`` clips: every pixel within ``tolerance`` in > ``min_fraction`` of the frames.

    Frames present in only one clip (different lengths) count as different.
    """
    frames = max(len(a), len(b))
    common = min(len(a), len(b))
    if frames == 0:
        return True
    diff = np.abs(a[:common].astype(np.float32) - b[:common].astype(np.float32))
    matching = int((diff.reshape(common, -1).max(axis=1) <= tolerance).sum())
    return matching > min_fraction * frames


def group_clips(
    lengths: np.ndarray,
    frame_means: np.ndarray,
    blocks: np.ndarray,
    load: Callable[[int], np.ndarray],
    tolerance: float = CLIP_TOLERANCE,
    min_fraction: float = CLIP_MIN_FRACTION,
    cache_size: int = 64,
) -> np.ndarray:
    """Clip id per trial (0, 1, … in order of first appearance): trials whose clips match (:func:`same_clip`).

    Args:
        lengths: ``(n,)`` valid frames per trial.
        frame_means: ``(n, F)`` mean grey level per frame, NaN past the length.
        blocks: ``(n, F, 48)`` block means per frame (:func:`block_means`), NaN past the length.
        load: ``load(i)`` → the valid frames ``(lengths[i], H, W)`` of trial ``i`` (for the final exact check).

    Signature then verify: a trial is compared with the first trial of every group found so far, in three steps
    that are each necessary for the next — lengths within the fraction, frame means within ``tolerance`` in enough
    frames (vectorised over all groups), block means likewise — and only the survivors get the pixel-exact rule.
    Greedy (first matching group wins): fine for repeats, which are identical or nearly so.
    """
    n = len(lengths)
    ids = np.full(n, -1, dtype=np.int64)
    reps: list[int] = []
    cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def video(i: int) -> np.ndarray:
        if i in cache:
            cache.move_to_end(i)
            return cache[i]
        cache[i] = load(i)
        if len(cache) > cache_size:
            cache.popitem(last=False)
        return cache[i]

    for i in range(n):
        match = -1
        if reps:
            r = np.asarray(reps)
            frames = np.maximum(lengths[r], lengths[i])
            with np.errstate(invalid="ignore"):
                close = np.abs(frame_means[r] - frame_means[i]) <= tolerance  # (R, F); NaN → False
            fraction = close.sum(axis=1) / np.maximum(frames, 1)
            ok = (np.minimum(lengths[r], lengths[i]) > min_fraction * frames) & (fraction > min_fraction)
            for g in np.flatnonzero(ok)[np.argsort(-fraction[ok], kind="stable")]:
                j = reps[g]
                with np.errstate(invalid="ignore"):
                    block_close = np.abs(blocks[j] - blocks[i]).max(axis=1) <= tolerance
                if block_close.sum() <= min_fraction * frames[g]:
                    continue
                if same_clip(video(j), video(i), tolerance, min_fraction):
                    match = int(g)
                    break
        if match < 0:
            reps.append(i)
            match = len(reps) - 1
        ids[i] = match
    return ids


def classify_stimulus(video: np.ndarray) -> str:
    """OOD family of one bonus trial from its valid frames ``(T, H, W)`` in grey levels (a documented heuristic).

    Features (fractions over frames or pixels): ``grey`` = frames that are uniform (pixel std < 2);
    ``background`` = pixels within 3 grey levels of their frame's median; ``extreme`` = pixels ≤ 5 or ≥ 250;
    ``still`` = frame-to-frame changes below 0.5 grey levels on average. Rules, in order:

    1. ``grey > 0.15`` → ``image`` (15-frame flashed images separated by 12–18 uniform grey frames);
    2. ``extreme > 0.01`` and ``background > 0.8`` → ``random_dots`` (small black/white dots on grey);
    3. ``still > 0.6`` → ``gaussian_dots`` (one dot held for 9 frames, then the next);
    4. ``background > 0.3`` → ``drifting_gabor`` (a Gabor patch moving every frame inside a grey surround);
    5. otherwise ``pink_noise`` (full-field moving texture).
    """
    t = video.shape[0]
    if t == 0:
        return "pink_noise"
    flat = video.reshape(t, -1).astype(np.float32)
    grey_frames = float((flat.std(axis=1) < 2.0).mean())
    if grey_frames > 0.15:
        return "image"
    median = np.median(flat, axis=1, keepdims=True)
    background = float((np.abs(flat - median) <= 3).mean())
    extreme = float(((flat <= 5) | (flat >= 250)).mean())
    if extreme > 0.01 and background > 0.8:
        return "random_dots"
    still = float((np.abs(np.diff(flat, axis=0)).mean(axis=1) < 0.5).mean()) if t > 1 else 1.0
    if still > 0.6:
        return "gaussian_dots"
    if background > 0.3:
        return "drifting_gabor"
    return "pink_noise"


def _vote(labels: list[str], clip_id: np.ndarray, bonus: np.ndarray) -> list[str]:
    """Give every bonus trial the most common label of the bonus trials of its clip group."""
    out = list(labels)
    for c in np.unique(clip_id[bonus]):
        members = np.flatnonzero(bonus & (clip_id == c))
        winner = Counter(labels[i] for i in members).most_common(1)[0][0]
        for i in members:
            out[i] = winner
    return out


# ---------------------------------------------------------------------------------------------------- write
class _NotGreyLevels(Exception):
    """A video turned out not to be integer grey levels: rewrite the store with float32 videos."""


def _create(
    group: zarr.Group,
    name: str,
    data_or_shape: np.ndarray | tuple[int, ...],
    dims: Sequence[str],
    *,
    dtype: Any = None,
    chunks: tuple[int, ...] | None = None,
    raw: bool = False,
    **attrs: Any,
) -> zarr.Array:
    """An array with ``dimension_names``; small ones (given as data) are written whole, one compressed chunk."""
    data = data_or_shape if isinstance(data_or_shape, np.ndarray) else None
    shape = data.shape if data is not None else tuple(data_or_shape)
    arr = group.create_array(
        name,
        shape=shape,
        dtype=data.dtype if data is not None else dtype,
        chunks=chunks or (shape if all(shape) else tuple(max(s, 1) for s in shape)),
        compressors=None if raw else _COMPRESSOR,
        dimension_names=list(dims),
        fill_value=0,
    )
    if data is not None and data.size:
        arr[...] = data
    if attrs:
        arr.attrs.update(attrs)
    return arr


def _categorical(group: zarr.Group, name: str, values: Sequence[str], labels: Sequence[str]) -> None:
    codes = np.array([list(labels).index(v) for v in values], dtype=np.int8)
    # CF conventions (xarray understands them): code k means labels[k].
    _create(group, name, codes, ["trial"], flag_values=list(range(len(labels))), flag_meanings=" ".join(labels))


class _Moments:
    """Streaming per-neuron count, mean and M2 (Chan et al.'s parallel update), float64."""

    def __init__(self, n: int) -> None:
        self.count = 0
        self.mean = np.zeros(n)
        self.m2 = np.zeros(n)

    def add(self, x: np.ndarray) -> None:
        """Add ``(T, N)`` frames."""
        if not len(x):
            return
        k = len(x)
        mean = x.mean(axis=0)
        m2 = ((x - mean) ** 2).sum(axis=0)
        delta = mean - self.mean
        total = self.count + k
        self.mean += delta * k / total
        self.m2 += m2 + delta**2 * self.count * k / total
        self.count = total

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count == 0:
            return np.zeros_like(self.mean), np.zeros_like(self.mean)
        return self.mean, np.sqrt(self.m2 / self.count)


def _write_store(  # noqa: C901 - one streaming pass over the trials, then the small arrays
    session: _Session, plan: _Plan, dest: Path, video_dtype: Any, fingerprint: str, tick: Callable[[], None]
) -> None:
    n, t_pad, n_neurons, h, w = plan.num_trials, plan.t_pad, plan.num_neurons, plan.height, plan.width
    limit = statistics_limit(plan.statistics)
    precision = official_precision(plan.statistics["responses"]["std"].astype(np.float64)).T  # (T_pad, N)
    root = zarr.open_group(dest, mode="w", zarr_format=3)
    big = ["trial", "frame"]
    videos = _create(
        root,
        "videos",
        (n, t_pad, h, w),
        [*big, "height", "width"],
        dtype=video_dtype,
        chunks=(1, t_pad, h, w),
        raw=True,
    )
    responses = _create(
        root,
        "responses",
        (n, t_pad, n_neurons),
        [*big, "neuron"],
        dtype=np.float32,
        chunks=(1, t_pad, n_neurons),
        raw=True,
    )
    rates = None
    if plan.ground_truth is not None:
        gt_group = root.create_group("ground_truth")
        rates = _create(
            gt_group,
            "rates",
            (n, t_pad, n_neurons),
            [*big, "neuron"],
            dtype=np.float32,
            chunks=(1, t_pad, n_neurons),
            raw=True,
        )
    behavior = np.zeros((n, t_pad, 2), dtype=np.float32)
    pupil = np.zeros((n, t_pad, 2), dtype=np.float32)
    lengths = np.zeros(n, dtype=np.int32)
    hidden = np.zeros(n, dtype=bool)
    frames = min(t_pad, MAX_FRAMES)
    frame_means = np.full((n, frames), np.nan, dtype=np.float32)
    blocks = np.full((n, frames, BLOCKS[0] * BLOCKS[1]), np.nan, dtype=np.float32)
    types: list[str] = []
    moments = {"raw": _Moments(n_neurons), "normalized": _Moments(n_neurons)}

    for i in range(n):
        arrays = {key: session.load(f"data/{key}/{i}.npy") for key in DATA_KEYS}  # time last
        length = valid_length(arrays, limit)
        lengths[i] = length
        r_src = arrays["responses"]
        hidden[i] = not np.any(r_src[~np.isnan(r_src)])
        v = arrays["videos"][..., :length].transpose(2, 0, 1)  # (H, W, T) -> (T, H, W)
        if video_dtype == np.uint8 and v.size and (v.min() < 0 or v.max() > 255 or not np.array_equal(v, np.round(v))):
            raise _NotGreyLevels
        video = np.zeros((t_pad, h, w), dtype=video_dtype)
        video[:length] = v
        videos[i] = video
        r = np.zeros((t_pad, n_neurons), dtype=np.float32)
        r[:length] = r_src[:, :length].T  # (N, T) -> (T, N)
        if not hidden[i]:
            responses[i] = r
        behavior[i, :length] = arrays["behavior"][:, :length].T
        pupil[i, :length] = arrays["pupil_center"][:, :length].T
        frame_means[i, :length] = v.reshape(length, -1).mean(axis=1)
        blocks[i, :length] = block_means(v)
        tier = str(plan.tiers[i])
        types.append(classify_stimulus(v) if tier.endswith("bonus") else "natural")
        if tier == "train" and not hidden[i]:
            x = r[:length].astype(np.float64)
            moments["raw"].add(x)
            moments["normalized"].add(x * precision[:length])
        if rates is not None and plan.ground_truth is not None:
            gt = _load_rates(plan.ground_truth, i)
            rt = np.zeros((t_pad, n_neurons), dtype=np.float32)
            rt[:length] = np.nan_to_num(gt[:, :length].T)
            rates[i] = rt
        tick()

    def load_video(i: int) -> np.ndarray:
        return np.asarray(videos[i, : lengths[i]])

    clip_id = group_clips(lengths.astype(np.int64), frame_means, blocks, load_video)
    bonus = np.array([t.endswith("bonus") for t in plan.tiers.tolist()])
    types = _vote(types, clip_id, bonus)

    _create(root, "behavior", behavior, ["trial", "frame", "signal"], labels="pupil_size running_speed")
    _create(root, "pupil_center", pupil, ["trial", "frame", "coordinate"], labels="x y")
    _create(root, "length", lengths, ["trial"])
    _create(root, "clip_id", clip_id, ["trial"])
    _create(root, "trial_index", np.arange(n, dtype=np.int32), ["trial"])
    _create(root, "hidden", hidden, ["trial"])
    _categorical(root, "tier", plan.tiers.tolist(), TIER_LABELS)
    _categorical(root, "stimulus_type", types, STIMULUS_TYPES)
    _create(root, "unit_ids", plan.unit_ids, ["neuron"])
    _create(root, "coordinates", plan.coordinates, ["neuron", "axis"])

    stat_dims = {
        "videos": ["frame", "height", "width"],
        "responses": ["frame", "neuron"],
        "behavior": ["frame", "signal"],
        "pupil_center": ["frame", "coordinate"],
    }
    stats = root.create_group("statistics")
    for key in DATA_KEYS:
        g = stats.create_group(key)
        for stat, arr in plan.statistics[key].items():
            _create(g, stat, np.ascontiguousarray(np.moveaxis(arr, -1, 0)), stat_dims[key])  # time first
    per_neuron = stats.create_group("responses_per_neuron")
    for scale, acc in moments.items():
        g = per_neuron.create_group(scale)
        mean, std = acc.result()
        _create(g, "mean", mean.astype(np.float32), ["neuron"])
        _create(g, "std", std.astype(np.float32), ["neuron"])
    per_neuron.attrs["frames"] = int(moments["raw"].count)

    if plan.ground_truth is not None:
        truth_group = root["ground_truth"]
        assert isinstance(truth_group, zarr.Group)
        ids = np.load(plan.ground_truth / "clip_ids.npy").astype(np.int64)
        _create(truth_group, "clip_id", ids, ["trial"])
        truth = np.load(plan.ground_truth / "stimulus_types.npy").astype(str).tolist()
        _categorical(truth_group, "stimulus_type", truth, STIMULUS_TYPES)

    root.attrs.update(
        {
            "session": session.name,
            "mouse_id": session.name,
            "num_neurons": int(n_neurons),
            "num_trials": int(n),
            "t_pad": int(t_pad),
            "height": int(h),
            "width": int(w),
            "max_frames": MAX_FRAMES,
            "format_version": FORMAT_VERSION,
            "source": session.where,
            "source_fingerprint": fingerprint,
            "has_ground_truth": plan.ground_truth is not None,
            "tier_labels": list(TIER_LABELS),
            "stimulus_type_labels": list(STIMULUS_TYPES),
            "clip_rule": f"every pixel within {CLIP_TOLERANCE} grey levels in > {CLIP_MIN_FRACTION:.0%} of frames",
            "created_by": "lightning_sensorium.data.convert",
        }
    )


def _load_rates(gt: Path, i: int) -> np.ndarray:
    try:
        return np.load(gt / "rates" / f"{i}.npy", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ConversionError(f"{gt}/rates/{i}.npy: not a readable .npy file ({err})") from err


# -------------------------------------------------------------------------------------------------- driver
def _existing(path: Path) -> dict[str, Any] | None:
    """The attributes of an existing store of ours, or None (not a zarr group, or not written by us)."""
    try:
        attrs = dict(zarr.open_group(path, mode="r").attrs)
    except Exception:  # noqa: BLE001 - anything unreadable is "not ours"
        return None
    return attrs if attrs.get("created_by") == "lightning_sensorium.data.convert" or "format_version" in attrs else None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _pending(sessions: list[_Session], out: Path, overwrite: bool) -> list[tuple[_Session, Path, str]]:
    """The sessions to (re)write: ``(session, destination, fingerprint)``; up-to-date ones are skipped."""
    todo = []
    for session in sessions:
        dest = out / f"{session.name}.zarr"
        fingerprint = _fingerprint(session)
        if dest.exists() or dest.is_symlink():
            attrs = _existing(dest)
            if attrs is not None and attrs.get("source_fingerprint") == fingerprint:
                print(f"{dest}: up to date")
                session.close()
                continue
            stale = (
                attrs is not None
                and attrs.get("format_version") != FORMAT_VERSION
                and attrs.get("source") == session.where
            )
            if stale:  # ours, from the same source path, older layout: rebuild without asking
                print(f"{dest}: rebuilding (format {attrs.get('format_version')} → {FORMAT_VERSION})")
            elif not overwrite:
                why = (
                    "is not a lightning_sensorium store"
                    if attrs is None
                    else f"was built from another source or format version (source {attrs.get('source')}, "
                    f"format {attrs.get('format_version')}; this converter writes format {FORMAT_VERSION})"
                )
                raise ConversionError(f"{dest}: output already exists and {why}; pass overwrite=True (--overwrite)")
        todo.append((session, dest, fingerprint))
    return todo


def _write_atomically(session: _Session, plan: _Plan, dest: Path, fingerprint: str, bar: Any) -> None:
    """Write ``<out>/.<name>.tmp-<pid>``, then rename it to ``dest`` (replacing an old store last)."""
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    task = bar.add_task(f"convert {session.name}", total=plan.num_trials) if bar is not None else None

    def tick() -> None:
        if bar is not None:
            bar.update(task, advance=1)

    try:
        try:
            _write_store(session, plan, tmp, np.uint8, fingerprint, tick)
        except _NotGreyLevels:  # the videos are not integer grey levels after all: keep them as float32
            shutil.rmtree(tmp, ignore_errors=True)
            if bar is not None:
                bar.reset(task)
            _write_store(session, plan, tmp, np.float32, fingerprint, tick)
        if dest.exists() or dest.is_symlink():
            trash = dest.parent / f".{dest.name}.old-{os.getpid()}"
            os.replace(dest, trash)
            os.replace(tmp, dest)
            _remove(trash)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        session.close()


def convert(
    sources: Sequence[str | Path], out_dir: str | Path, *, overwrite: bool = False, progress: bool = True
) -> list[Path]:
    """Convert release sessions to ``out_dir/<mouse_id>.zarr`` stores; returns the store paths, in source order.

    Raises ConversionError (a ValueError) on bad input; nothing is then left in ``out_dir`` for the failing mouse
    (mice converted before it are complete stores). An existing store built from the same, unchanged source is
    kept ("up to date"); one of ours built from the same source path in an older format version is rebuilt; any
    other existing ``<mouse_id>.zarr`` is an error unless ``overwrite``.
    """
    sessions = find_sessions(sources)
    if not sessions:
        raise ConversionError("no session given")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out}: exists and is not a folder")
    results = [out / f"{s.name}.zarr" for s in sessions]
    created = not out.exists()
    try:
        todo = _pending(sessions, out, overwrite)
        plans = [_validate(s) for s, _, _ in todo]  # everything checkable is checked before anything is written
        if not todo:
            return results
        out.mkdir(parents=True, exist_ok=True)
        bar_ctx: Any = contextlib.nullcontext()
        if progress:
            from rich.progress import Progress

            bar_ctx = Progress()
        with bar_ctx as bar:
            for (session, dest, fingerprint), plan in zip(todo, plans, strict=True):
                _write_atomically(session, plan, dest, fingerprint, bar)
    except BaseException:
        if created and out.exists():
            with contextlib.suppress(OSError):
                out.rmdir()  # only if still empty: a folder created for nothing
        raise
    finally:
        for session in sessions:
            session.close()
    return results


def iter_store_paths(root: str | Path) -> Iterator[Path]:
    """The ``*.zarr`` stores directly under ``root``."""
    yield from sorted(p for p in Path(root).glob("*.zarr") if p.is_dir())
