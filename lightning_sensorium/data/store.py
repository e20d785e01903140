"""MouseStore: read access to one converted mouse (``<mouse_id>.zarr``), local or behind an fsspec URL.

Cheap to open and safe to hand to DataLoader workers. A frame window of an uncompressed one-chunk-per-trial array
(what ``convert`` writes) is one contiguous byte range, read with one positioned read or HTTP range request instead
of zarr's per-chunk machinery; any other layout is read through zarr. The layout it reads: docs/data.md, "Store
contract".
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from functools import cached_property, partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import zarr

from lightning_sensorium.data.layout import DATA_KEYS, STATISTICS, TIERS

_SMALL = ("length", "tier", "clip_id", "stimulus_type", "hidden", "trial_index", "unit_ids", "coordinates")
#: Small arrays whose chunks are always written: zarr leaves a chunk equal to the fill value unwritten (an all-False
#: ``hidden``, all-natural ``stimulus_type``), but no valid store has all-zero lengths, behaviour or neuron ids.
_NEVER_FILL = ("length", "behavior", "pupil_center", "unit_ids")
#: Seconds to wait before each retry of a remote read that failed with anything but "not found".
RETRY_DELAYS = (0.5, 2.0, 8.0)


class StoreError(ValueError):
    """A store that cannot be read as written: a missing or short chunk, corrupt metadata, a server that fails."""


class _RawLayout(NamedTuple):
    """How to find frames of one trial of an uncompressed one-chunk-per-trial array."""

    dtype: np.dtype
    trial_shape: tuple[int, ...]  # (T_pad, ...)
    frame_bytes: int
    chunk_suffix: str  # "/0/0" or "/0/0/0": the chunk key after "<name>/c/<trial>"


def is_url(path: str | Path) -> bool:
    """True for an fsspec URL (``http://``, ``s3://``, ``file://``, ...), False for a local path."""
    return "://" in str(path)


def _with_retries(url: str, read: Callable[[], bytes]) -> bytes:
    """``read()``, retried after :data:`RETRY_DELAYS` on any error but "not found" (a server that hiccups), then a
    :class:`StoreError` naming the URL."""
    for attempt, delay in enumerate((*RETRY_DELAYS, None)):
        try:
            return read()
        except FileNotFoundError:
            raise
        except Exception as err:  # fsspec's HTTP errors come from aiohttp, timeouts from asyncio
            if delay is None:
                raise StoreError(f"{url}: read failed {attempt + 1} times ({type(err).__name__}: {err})") from err
            time.sleep(delay)
    raise AssertionError("unreachable")


class MouseStore:
    """One mouse's zarr store, read-only.

    Opening is cheap — the attributes and the small per-trial arrays (lengths, tiers, clip ids, stimulus types, hidden
    flags, behaviour, pupil centre), which are then kept in memory — because the datamodule opens every store in
    ``__init__`` to give the model its neuron information. The big arrays (``videos``, ``responses``, ground-truth
    ``rates``) are opened lazily in each process: only the path is pickled, and handles made before a fork are not
    reused after it, so a store can go into DataLoader workers (fork or spawn).

    Args:
        path_or_url: the store folder, or a URL such as ``http://host/stores/<mouse_id>.zarr`` (any fsspec protocol).
        storage_options: passed to fsspec for URLs.
    """

    def __init__(self, path_or_url: str | Path, storage_options: dict[str, Any] | None = None) -> None:
        self.path = str(path_or_url).rstrip("/")
        self.storage_options = storage_options
        self.remote = is_url(self.path)
        if not self.remote and not Path(self.path).is_dir():
            raise FileNotFoundError(f"{self.path}: no such store")
        self._handles: dict[str, Any] = {}
        try:
            root = self._root()
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise StoreError(f"{self.path}: cannot read the store's metadata (zarr.json): {err}") from err
        attrs: dict[str, Any] = dict(root.attrs)
        missing = [k for k in ("mouse_id", "num_neurons", "num_trials", "format_version") if k not in attrs]
        if missing:
            raise ValueError(f"{self.path}: not a lightning_sensorium store (attributes {missing} missing)")
        self.attrs = attrs
        self.mouse_id: str = str(attrs["mouse_id"])
        self.num_neurons: int = int(attrs["num_neurons"])
        self.num_trials: int = int(attrs["num_trials"])
        self.t_pad: int = int(attrs["t_pad"])
        self.video_shape: tuple[int, int] = (int(attrs["height"]), int(attrs["width"]))
        self.has_ground_truth: bool = bool(attrs.get("has_ground_truth", False))
        small = {k: self._read_whole(root, k) for k in _SMALL}
        self.length: np.ndarray = small["length"].astype(np.int64)  # (trial,) valid frames
        self.tier_code: np.ndarray = small["tier"]  # (trial,) int8
        self.tier_labels: list[str] = str(root["tier"].attrs["flag_meanings"]).split()
        self.clip_id: np.ndarray = small["clip_id"]  # (trial,)
        self.stimulus_code: np.ndarray = small["stimulus_type"]  # (trial,) int8
        self.stimulus_labels: list[str] = str(root["stimulus_type"].attrs["flag_meanings"]).split()
        self.hidden: np.ndarray = small["hidden"].astype(bool)  # (trial,)
        self.trial_index: np.ndarray = small["trial_index"]  # (trial,) file number i of i.npy
        self.unit_ids: np.ndarray = small["unit_ids"]  # (neuron,)
        self.coordinates: np.ndarray = small["coordinates"]  # (neuron, 3)
        self.behavior: np.ndarray = self._read_whole(root, "behavior")  # (trial, frame, 2) small: kept in memory
        self.pupil_center: np.ndarray = self._read_whole(root, "pupil_center")  # (trial, frame, 2)

    def __repr__(self) -> str:
        return f"MouseStore({self.path!r}: {self.num_trials} trials, {self.num_neurons} neurons)"

    def _read_whole(self, root: zarr.Group, name: str) -> np.ndarray:
        """A small array read whole, refusing missing chunks (zarr would fill them in silently) and corrupt ones."""
        try:
            arr = root[name]
            if not self.remote and name in _NEVER_FILL and arr.nchunks_initialized < arr.nchunks:
                raise StoreError(
                    f"{self.path}/{name}: {arr.nchunks - arr.nchunks_initialized} of {arr.nchunks} chunks are missing"
                )
            return np.asarray(arr[...])
        except StoreError:
            raise
        except Exception as err:  # zarr and its codecs raise many types (KeyError, RuntimeError from blosc, ...)
            raise StoreError(f"{self.path}/{name}: cannot read ({type(err).__name__}: {err})") from err

    # ------------------------------------------------------------------------------------- per-process handles
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}  # zarr/fsspec handles are re-made in the receiving process
        return state

    def _state(self) -> dict[str, Any]:
        """Handles of this process (dropped after a fork: the child makes its own)."""
        if self._handles.get("pid") != os.getpid():
            self._handles = {"pid": os.getpid(), "arrays": {}, "layouts": {}}
        return self._handles

    def _root(self) -> zarr.Group:
        state = self._state()
        if "root" not in state:
            state["root"] = zarr.open_group(self.path, mode="r", storage_options=self.storage_options)
        return state["root"]

    def _array(self, name: str) -> zarr.Array:
        arrays = self._state()["arrays"]
        if name not in arrays:
            arrays[name] = self._root()[name]
        return arrays[name]

    def _fs(self) -> Any:
        state = self._state()
        if "fs" not in state:
            import fsspec

            state["fs"] = fsspec.core.url_to_fs(self.path, **(self.storage_options or {}))[0]
        return state["fs"]

    def _layout(self, name: str) -> _RawLayout | None:
        """The raw layout of a big array, or None if it must be read through zarr."""
        layouts = self._state()["layouts"]
        if name not in layouts:
            arr = self._array(name)
            meta = arr.metadata
            codecs: tuple[Any, ...] = tuple(getattr(meta, "codecs", ()))
            encoding = getattr(meta, "chunk_key_encoding", None)
            raw = (
                getattr(meta, "zarr_format", 2) == 3
                and len(codecs) == 1
                and type(codecs[0]).__name__ == "BytesCodec"
                and str(getattr(codecs[0].endian, "value", codecs[0].endian)) in ("little", "None")
                and getattr(encoding, "name", "") == "default"
                and getattr(encoding, "separator", "") == "/"
                and arr.chunks == (1, *arr.shape[1:])
            )
            dtype = np.dtype(arr.dtype).newbyteorder("<")
            frame_bytes = int(np.prod(arr.shape[2:])) * dtype.itemsize
            layouts[name] = _RawLayout(dtype, tuple(arr.shape[1:]), frame_bytes, "/0" * (arr.ndim - 1)) if raw else None
        return layouts[name]

    # ------------------------------------------------------------------------------------------ raw reads
    def _read_frames(self, names: Sequence[str], trial: int, start: int, stop: int) -> dict[str, np.ndarray]:
        """Frames ``[start, stop)`` of one trial of several big arrays (hints all reads first, then reads)."""
        out: dict[str, np.ndarray] = {}
        todo: list[tuple[str, _RawLayout, str, int, int]] = []
        for name in names:
            layout = self._layout(name)
            if layout is None:
                out[name] = np.asarray(self._array(name)[trial, start:stop])
                continue
            key = f"{name}/c/{trial}{layout.chunk_suffix}"
            todo.append((name, layout, key, start * layout.frame_bytes, (stop - start) * layout.frame_bytes))
        reader = self._read_remote if self.remote else self._read_local
        for (name, layout, key, _, _), data in zip(todo, reader([(k, o, n) for _, _, k, o, n in todo]), strict=True):
            shape = (stop - start, *layout.trial_shape[1:])
            if data is None and not (name == "responses" and self.hidden[trial]):
                # Only the all-zero responses of hidden test trials are left unwritten by `convert`.
                raise StoreError(
                    f"{self.path}: the {name} chunk of trial {trial} ({key}) is missing; the store is incomplete: "
                    "run `lightning-sensorium verify` on it and convert the session again"
                )
            out[name] = np.zeros(shape, layout.dtype) if data is None else data.view(layout.dtype).reshape(shape)
        return out

    def _read_local(self, requests: list[tuple[str, int, int]]) -> list[np.ndarray | None]:
        """Positioned reads of ``(key, offset, size)``; None where the chunk was never written (all fill value)."""
        fds: list[int | None] = []
        try:
            for key, offset, size in requests:
                try:
                    fd = os.open(os.path.join(self.path, key), os.O_RDONLY)
                except FileNotFoundError:
                    fds.append(None)
                    continue
                fds.append(fd)
                if size and hasattr(os, "posix_fadvise"):  # start all reads at once: the disk sees them together
                    os.posix_fadvise(fd, offset, size, os.POSIX_FADV_WILLNEED)
            results: list[np.ndarray | None] = []
            for handle, (key, offset, size) in zip(fds, requests, strict=True):
                if handle is None:
                    results.append(None)
                    continue
                buf = np.empty(size, np.uint8)
                done = 0
                while done < size:
                    n = os.preadv(handle, [buf.data[done:]], offset + done)
                    if n == 0:
                        raise StoreError(
                            f"{self.path}/{key}: chunk shorter than expected ({offset + done} bytes, needed "
                            f"{offset + size}); the store is damaged: convert the session again"
                        )
                    done += n
                results.append(buf)
            return results
        finally:
            for handle in fds:
                if handle is not None:
                    os.close(handle)

    def _read_remote(self, requests: list[tuple[str, int, int]]) -> list[np.ndarray | None]:
        """HTTP range requests (fsspec); servers that ignore ``Range`` send the whole chunk, which is sliced."""
        fs = self._fs()
        results: list[np.ndarray | None] = []
        for key, offset, size in requests:
            if size == 0:
                results.append(np.empty(0, np.uint8))
                continue
            url = f"{self.path}/{key}"
            try:
                data = _with_retries(url, partial(fs.cat_file, url, start=offset, end=offset + size))
            except FileNotFoundError:
                results.append(None)
                continue
            if len(data) != size:  # the whole chunk came back
                data = data[offset : offset + size]
            if len(data) != size:
                raise StoreError(f"{url}: expected {size} bytes at {offset}, got {len(data)}")
            results.append(np.frombuffer(data, np.uint8))
        return results

    # -------------------------------------------------------------------------------------------- metadata
    def trials(self, tiers: Sequence[str] | str) -> np.ndarray:
        """Trial numbers (rows of the store), ascending, whose tier is one of ``tiers``."""
        tiers = [tiers] if isinstance(tiers, str) else list(tiers)
        unknown = [t for t in tiers if t not in TIERS]
        if unknown:
            raise ValueError(f"unknown tier(s) {unknown}; expected some of {list(TIERS)}")
        codes = [self.tier_labels.index(t) for t in tiers if t in self.tier_labels]
        return np.flatnonzero(np.isin(self.tier_code, codes))

    def tier_names(self) -> list[str]:
        """Tier of every trial."""
        return [self.tier_labels[c] for c in self.tier_code]

    def stimulus_type_names(self) -> list[str]:
        """Stimulus type of every trial (one of ``STIMULUS_TYPES``)."""
        return [self.stimulus_labels[c] for c in self.stimulus_code]

    @cached_property
    def statistics(self) -> dict[str, dict[str, np.ndarray]]:
        """The official per-frame statistics, time first: videos (T, H, W), responses (T, N), others (T, 2)."""
        root = self._root()
        return {k: {s: np.asarray(root[f"statistics/{k}/{s}"][...]) for s in STATISTICS} for k in DATA_KEYS}

    @cached_property
    def neuron_statistics(self) -> dict[str, dict[str, np.ndarray]]:
        """Per-neuron mean and std ``(N,)`` over the valid train frames: ``raw`` and ``normalized`` (official)."""
        root = self._root()
        return {
            k: {s: np.asarray(root[f"statistics/responses_per_neuron/{k}/{s}"][...]) for s in ("mean", "std")}
            for k in ("raw", "normalized")
        }

    @cached_property
    def checksums(self) -> dict[str, np.ndarray]:
        """CRC-32 of each trial chunk as ``convert`` wrote it, per array (``videos``, ``responses``, ``rates``):
        ``(trial,)`` uint32, 0 where not written; empty for stores converted before format 4."""
        root = self._root()
        if "checksums" not in root:
            return {}
        group: Any = root["checksums"]
        return {name: np.asarray(group[name][...]) for name in group.array_keys()}

    @cached_property
    def ground_truth(self) -> dict[str, np.ndarray]:
        """Generator ground truth of synthetic mice: ``clip_id`` and ``stimulus_type`` codes (empty if none)."""
        if not self.has_ground_truth:
            return {}
        root = self._root()
        return {k: np.asarray(root[f"ground_truth/{k}"][...]) for k in ("clip_id", "stimulus_type")}

    # ------------------------------------------------------------------------------------------------ data
    def read(self, trial: int, start: int, stop: int, rates: bool = False) -> dict[str, np.ndarray]:
        """Raw, time-first arrays of frames ``[start, stop)`` of one trial (0 past the trial's ``length``).

        ``videos (T, H, W)`` uint8 (or float32), ``responses (T, N)`` float32, ``behavior (T, 2)``,
        ``pupil_center (T, 2)``, and the ground-truth ``rates (T, N)`` if asked (synthetic mice only).
        """
        trial, start, stop = int(trial), int(start), int(stop)
        if not 0 <= trial < self.num_trials:
            raise IndexError(f"{self.mouse_id}: trial {trial} out of range [0, {self.num_trials})")
        if not 0 <= start <= stop <= self.t_pad:
            raise IndexError(f"{self.mouse_id}: frames [{start}, {stop}) outside [0, {self.t_pad}]")
        if rates and not self.has_ground_truth:
            raise ValueError(f"{self.mouse_id}: rates asked for, but the store has no ground truth")
        names = ["videos", "responses", *(["ground_truth/rates"] if rates else [])]
        big = self._read_frames(names, trial, start, stop)
        out = {
            "videos": big["videos"],
            "responses": big["responses"],
            "behavior": self.behavior[trial, start:stop].copy(),
            "pupil_center": self.pupil_center[trial, start:stop].copy(),
        }
        if rates:
            out["rates"] = big["ground_truth/rates"]
        return out
