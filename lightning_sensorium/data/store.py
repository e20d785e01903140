"""MouseStore: read access to one converted mouse (``<mouse_id>.zarr``), local or behind an fsspec URL.

Opening is cheap (attributes and the small per-trial arrays only) because the datamodule opens every store in
``__init__`` to give the model its neuron information. The big arrays (``videos``, ``responses``, ground-truth
``rates``) are opened lazily in each process, so a store can be pickled into DataLoader workers.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from lightning_sensorium.data.layout import DATA_KEYS, STIMULUS_TYPES, TIERS

_STATS = ("mean", "std", "min", "max", "median")


class MouseStore:
    """One mouse's zarr store.

    Args:
        path: the store folder, or a URL such as ``http://host/stores/<mouse_id>.zarr`` (any fsspec protocol).
        storage_options: passed to fsspec for URLs.
    """

    def __init__(self, path: str | Path, storage_options: dict[str, Any] | None = None) -> None:
        self.path = str(path)
        self.storage_options = storage_options
        if "://" not in self.path and not Path(self.path).is_dir():
            raise FileNotFoundError(f"{self.path}: no such store")
        root = self._open()
        attrs: dict[str, Any] = dict(root.attrs)
        missing = [k for k in ("mouse_id", "num_neurons", "num_trials", "format_version") if k not in attrs]
        if missing:
            raise ValueError(f"{self.path}: not a lightning_sensorium store (attributes {missing} missing)")
        self.attrs = attrs
        self.mouse_id: str = str(attrs["mouse_id"])
        self.num_neurons: int = int(attrs["num_neurons"])
        self.num_trials: int = int(attrs["num_trials"])
        self.has_ground_truth: bool = bool(attrs.get("has_ground_truth", False))
        small = {
            k: np.asarray(root[k][...])
            for k in ("length", "tier", "clip_id", "stimulus_type", "hidden", "trial_index", "unit_ids", "coordinates")
        }
        self.length: np.ndarray = small["length"].astype(np.int64)
        self.tier_code: np.ndarray = small["tier"]
        self.tier_labels: list[str] = str(root["tier"].attrs["flag_meanings"]).split()
        self.clip_id: np.ndarray = small["clip_id"]
        self.stimulus_code: np.ndarray = small["stimulus_type"]
        self.hidden: np.ndarray = small["hidden"].astype(bool)
        self.trial_index: np.ndarray = small["trial_index"]
        self.unit_ids: np.ndarray = small["unit_ids"]
        self.coordinates: np.ndarray = small["coordinates"]
        # Behaviour and pupil centre are small (trials × T_pad × 2): kept in memory.
        self.behavior: np.ndarray = np.asarray(root["behavior"][...])
        self.pupil_center: np.ndarray = np.asarray(root["pupil_center"][...])
        self.video_shape: tuple[int, int] = (int(attrs["height"]), int(attrs["width"]))
        self._arrays: dict[str, Any] = {}
        self._raw_layout: dict[str, tuple[Any, ...]] = {}

    def _open(self) -> zarr.Group:
        return zarr.open_group(self.path, mode="r", storage_options=self.storage_options)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"], state["_raw_layout"] = {}, {}  # zarr handles are re-opened in the worker process
        return state

    def _array(self, name: str) -> Any:
        if name not in self._arrays:
            self._arrays[name] = self._open()[name]
        return self._arrays[name]

    def _raw(self, name: str) -> tuple[Any, tuple[int, ...]] | None:
        """``(dtype, trial shape)`` if ``name`` is a raw, one-chunk-per-trial array of a local store, else None."""
        if name not in self._raw_layout:
            arr = self._array(name)
            raw = (
                "://" not in self.path
                and not arr.compressors
                and arr.shards is None
                and arr.chunks == (1, *arr.shape[1:])
                and len(arr.metadata.codecs) == 1
                and arr.metadata.chunk_key_encoding.separator == "/"
            )
            self._raw_layout[name] = (arr.dtype.newbyteorder("<"), tuple(arr.shape[1:])) if raw else ()
        layout = self._raw_layout[name]
        return (layout[0], layout[1]) if layout else None

    def _slice(self, name: str, trial: int, start: int, stop: int) -> np.ndarray:
        """Frames ``[start, stop)`` of one trial of a big array.

        Zarr v3 stores an uncompressed chunk as the array's bytes in C order at ``<name>/c/<trial>/0[/0…]`` (the
        default chunk key encoding). With one chunk per trial, time first, a window is one contiguous byte range:
        one positioned read, no decoding, nothing else of the trial touched. Remote or compressed arrays go
        through zarr.
        """
        layout = self._raw(name)
        if layout is None:
            return np.asarray(self._array(name)[trial, start:stop])
        dtype, shape = layout
        stop = min(stop, shape[0])
        frame = int(np.prod(shape[1:]))
        chunk = Path(self.path, *name.split("/"), "c", str(trial), *(["0"] * len(shape)))
        if not chunk.is_file():  # chunks equal to the fill value (0) are not written
            return np.zeros((stop - start, *shape[1:]), dtype)
        data = np.fromfile(chunk, dtype=dtype, count=(stop - start) * frame, offset=start * frame * dtype.itemsize)
        return data.reshape(stop - start, *shape[1:])

    # -------------------------------------------------------------------------------------------- metadata
    def trials(self, tiers: list[str] | tuple[str, ...]) -> np.ndarray:
        """Trial numbers (rows of the store) whose tier is one of ``tiers``."""
        unknown = [t for t in tiers if t not in TIERS]
        if unknown:
            raise ValueError(f"unknown tier(s) {unknown}; expected some of {list(TIERS)}")
        codes = [self.tier_labels.index(t) for t in tiers]
        return np.flatnonzero(np.isin(self.tier_code, codes))

    def tier_names(self) -> list[str]:
        return [self.tier_labels[c] for c in self.tier_code]

    def stimulus_type_names(self) -> list[str]:
        return [STIMULUS_TYPES[c] for c in self.stimulus_code]

    @cached_property
    def statistics(self) -> dict[str, dict[str, np.ndarray]]:
        """The official per-frame statistics, time first: videos (T, H, W), responses (T, N), others (T, 2)."""
        root = self._open()
        return {k: {s: np.asarray(root[f"statistics/{k}/{s}"][...]) for s in _STATS} for k in DATA_KEYS}

    @cached_property
    def neuron_statistics(self) -> dict[str, dict[str, np.ndarray]]:
        """Per-neuron mean and std over the valid train frames: ``raw`` and ``normalized`` (official scaling)."""
        root = self._open()
        return {
            k: {s: np.asarray(root[f"statistics/responses_per_neuron/{k}/{s}"][...]) for s in ("mean", "std")}
            for k in ("raw", "normalized")
        }

    @cached_property
    def ground_truth(self) -> dict[str, np.ndarray]:
        """Generator ground truth of synthetic mice: ``clip_id`` and ``stimulus_type`` codes (empty if none)."""
        if not self.has_ground_truth:
            return {}
        root = self._open()
        return {k: np.asarray(root[f"ground_truth/{k}"][...]) for k in ("clip_id", "stimulus_type")}

    # ------------------------------------------------------------------------------------------------ data
    def read(self, trial: int, start: int, stop: int, rates: bool = False) -> dict[str, np.ndarray]:
        """Raw, time-first arrays of frames ``[start, stop)`` of one trial.

        ``videos (T, H, W)``, ``responses (T, N)``, ``behavior (T, 2)``, ``pupil_center (T, 2)``, and the
        ground-truth ``rates (T, N)`` if asked (synthetic mice only).
        """
        out = {
            "videos": self._slice("videos", trial, start, stop),
            "responses": self._slice("responses", trial, start, stop),
            "behavior": self.behavior[trial, start:stop],
            "pupil_center": self.pupil_center[trial, start:stop],
        }
        if rates:
            out["rates"] = self._slice("ground_truth/rates", trial, start, stop)
        return out
