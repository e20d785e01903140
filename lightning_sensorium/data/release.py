"""Reading and checking an official SENSORIUM 2023 release: session folders, or sessions inside the release's
``.zip`` archives (members read, never extracted; ``__MACOSX/`` ignored), or folders holding several of them.

:func:`validate` checks everything that can be checked without reading the big arrays (folders, file counts,
every ``.npy`` header and size, the metadata, the behaviour files, a synthetic mouse's ground truth), so that a
conversion stops before writing anything. The layout is in :mod:`lightning_sensorium.data.layout`.
"""

from __future__ import annotations

import io
import logging
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

import numpy as np

from lightning_sensorium.data.layout import (
    DATA_KEYS,
    GROUND_TRUTH_DIR,
    STATISTICS,
    STIMULUS_TYPES,
    TIER_LABELS,
    TIERS,
)

_EXPECTED_SHAPES = {  # time last, as in the release (for error messages)
    "videos": "(H, W, T_pad)",
    "responses": "(N, T_pad)",
    "behavior": "(2, T_pad)",
    "pupil_center": "(2, T_pad)",
}


log = logging.getLogger(__name__)


class ConversionError(ValueError):
    """Bad input to ``convert``: the message names the file or field and what was expected."""


# ------------------------------------------------------------------------------------------------- sources
class Session:
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


def find_sessions(sources: Sequence[str | Path]) -> list[Session]:
    """Session folders, sessions inside .zip archives, or the sessions inside folders of them."""
    sessions: list[Session] = []
    for src in map(Path, sources):
        if not src.exists():
            raise ConversionError(f"{src}: no such file or folder")
        if src.is_file() and src.suffix == ".zip":
            sessions.extend(_zip_sessions(src))
        elif src.is_dir() and _is_session_folder(src):
            sessions.append(Session(src.name, folder=src))
        elif src.is_dir():
            inner = [p for p in sorted(src.iterdir()) if p.name != GROUND_TRUTH_DIR and not p.name.startswith(".")]
            found = [Session(p.name, folder=p) for p in inner if p.is_dir() and _is_session_folder(p)]
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


def _zip_sessions(path: Path) -> list[Session]:
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if "__MACOSX" not in n]
    except zipfile.BadZipFile as err:
        raise ConversionError(f"{path}: not a readable .zip archive ({err})") from err
    marker = "meta/trials/tiers.npy"
    prefixes = sorted({n[: -len(marker)] for n in names if n.endswith(marker)})
    if not prefixes:
        raise ConversionError(f"{path}: no session inside the archive (no {marker})")
    return [Session(PurePosixPath(p).name or path.stem, archive=path, prefix=p) for p in prefixes]


# ------------------------------------------------------------------------------------------------ validation
@dataclass
class SessionPlan:
    """What :func:`validate` learnt of a session: its metadata, official statistics and array sizes."""

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


def validate(session: Session) -> SessionPlan:  # noqa: C901 - one linear list of checks
    """Check a session without reading its big arrays; raises ConversionError naming the file and what was expected."""
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
        for stat in STATISTICS:
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
    return SessionPlan(tiers, unit_ids, coords, statistics, t_pad, height, width, gt)


def check_trial_values(arrays: dict[str, np.ndarray], where: str, trial: int) -> None:
    """Refuse values the release never holds, for one trial's arrays (time last): Inf anywhere, and a NaN with data
    after it in the same key (a gap inside the trial, not the trailing padding; the partially NaN last frame of a
    natural trial has no data after it). Warn (logging) when one key's NaN padding starts more than one frame before
    another's data ends: the official rule then cuts the whole trial at that key's first NaN."""
    ends: dict[str, int] = {}
    for key, x in arrays.items():
        flat = x.reshape(-1, x.shape[-1])  # (elements, T)
        rel = f"{where}/data/{key}/{trial}.npy"
        inf = np.isinf(flat).any(axis=0)
        if inf.any():
            raise ConversionError(f"{rel}: Inf at frame {int(np.argmax(inf))}; the release holds finite values")
        nan = np.isnan(flat)
        has_nan, has_data = nan.any(axis=0), (~nan).any(axis=0)  # (T,) each
        if not has_nan.any():
            continue  # no padding (behaviour, hidden all-zero responses)
        first = int(np.argmax(has_nan))
        if has_data[first + 1 :].any():
            after = first + 1 + int(np.argmax(has_data[first + 1 :]))
            raise ConversionError(
                f"{rel}: NaN at frame {first} with data after it (frame {after}); the release pads trials with NaN "
                "only after their end"
            )
        ends[key] = first
    if ends and max(ends.values()) - min(ends.values()) > 1:
        short = min(ends, key=ends.__getitem__)
        log.warning(
            "%s/data/%s/%d.npy: NaN from frame %d cuts the trial short (%s has data to frame %d)",
            where,
            short,
            trial,
            ends[short],
            max(ends, key=ends.__getitem__),
            max(ends.values()),
        )


def _load_npy(path: Path) -> np.ndarray:
    """``np.load`` without pickles; a missing or unreadable file raises ConversionError naming it."""
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError as err:
        raise ConversionError(f"{path}: missing file") from err
    except (ValueError, OSError, EOFError) as err:
        raise ConversionError(f"{path}: not a readable .npy file ({err})") from err


def _validate_ground_truth(gt: Path, n: int, rate_shape: tuple[int, int]) -> None:
    ids, types = _load_npy(gt / "clip_ids.npy"), _load_npy(gt / "stimulus_types.npy")
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


def load_rates(gt: Path, i: int) -> np.ndarray:
    """Noiseless rates ``(N, T_pad)`` of trial ``i`` from a synthetic mouse's ground-truth folder ``gt``."""
    return _load_npy(gt / "rates" / f"{i}.npy")
