"""One validated release session → one zarr v3 store (the layout: docs/data.md, "Store contract").

Rules:

* ``length`` = the official ``CutVideos(max_frame=None)`` cut: the first frame where any element of any key is NaN,
  or where the per-frame statistics end (NaN: no train trial has that frame, :func:`statistics_limit`), capped at
  ``MAX_FRAMES`` (300). Hidden test responses (all zeros) are flagged in ``hidden``; zeros are not NaN, so they do
  not cut.
* frames ≥ ``length`` are stored as 0 (the store holds no NaN);
* clip ids and stimulus types are inferred from the pixels (:mod:`lightning_sensorium.data.content`);
* the official per-frame statistics are kept (time first); per-neuron response statistics (mean, std over the valid
  frames of the non-hidden train trials, raw and after the official scaling) are accumulated while streaming.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from lightning_sensorium.data.content import (
    BLOCKS,
    CLIP_MIN_FRACTION,
    CLIP_TOLERANCE,
    block_means,
    classify_stimulus,
    group_clips,
    vote_within_clips,
)
from lightning_sensorium.data.layout import DATA_KEYS, MAX_FRAMES, STIMULUS_TYPES, TIER_LABELS
from lightning_sensorium.data.normalization import response_precision
from lightning_sensorium.data.release import Session, SessionPlan, check_trial_values, load_rates

#: Bump when the store layout or a derived field changes; older stores are rebuilt only with ``overwrite``.
FORMAT_VERSION = 4  # 4: every non-hidden trial chunk written, CRC-32 checksums of the trial chunks
#: ``created_by`` attribute of the stores written here (the converter's module name when the format was fixed).
CREATED_BY = "lightning_sensorium.data.convert"
#: Small arrays are compressed. The big per-trial arrays (videos, responses, rates) are stored raw, one chunk per
#: trial, time first, so that a window is one contiguous byte range (BENCHMARKS.md: Blosc compresses the sparse
#: responses 1.4–2.2× but decoding costs more than the disk reads it saves, and ~1.0× on tiny-negative noise).
_COMPRESSOR = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")


def statistics_limit(statistics: dict[str, dict[str, np.ndarray]], max_frames: int = MAX_FRAMES) -> int:
    """First frame without statistics (a used statistic NaN for every element), capped at ``max_frames``.

    neuralpredictors' ``NeuroNormalizer`` (https://github.com/sinzlab/neuralpredictors/blob/main/neuralpredictors/
    data/transforms.py): videos ``(x - mean) / std``, behaviour ``x * (1 / std)``, pupil centre ``(x - mean) / std``
    propagate NaN statistics; responses ``x * precision`` do not (a NaN std takes the ``1 / (0.01·nanmean(std))``
    branch). The statistics are NaN where no train trial has frames (≥ 300 in the release): those frames are cut.
    A statistic NaN for only *some* elements of a frame does not cut (the official loader would): that happens when
    every train trial has NaN at the same pixels — the synthetic release's partially NaN last frame (299) does
    this, while real long trials come out of the official loader with 300 frames.
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
    """The official ``CutVideos(max_frame=None)`` length (neuralpredictors' ``data/transforms.py``, URL above): first
    frame where any element of any key (time last) is NaN, at most ``limit`` (:func:`statistics_limit`).

    Unlike the official loader, a zero std (behaviour ``0 * inf``, a video pixel equal to its mean ``0 / 0``) does not
    cut: that is an artefact of the official normaliser, which our own normaliser avoids.
    """
    length = limit
    for x in arrays.values():
        nan = np.isnan(x.reshape(-1, x.shape[-1])[:, :length]).any(axis=0)
        if nan.any():
            length = int(np.argmax(nan))
    return length


class NotGreyLevels(Exception):
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
    write_empty_chunks: bool = False,
    **attrs: Any,
) -> zarr.Array:
    """An array with ``dimension_names``; small ones (given as data) are written whole, one compressed chunk.
    ``write_empty_chunks``: write chunks equal to the fill value too (zarr skips them by default), so that a missing
    chunk file always means damage."""
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
        config={"write_empty_chunks": write_empty_chunks},
    )
    if data is not None and data.size:
        arr[...] = data
    if attrs:
        arr.attrs.update(attrs)
    return arr


def _per_trial(group: zarr.Group, name: str, shape: tuple[int, ...], dims: list[str], dtype: Any) -> zarr.Array:
    """A big ``(trial, frame, *dims)`` array: uncompressed, one chunk per trial (one byte range per window)."""
    chunks = (1, *shape[1:])
    return _create(
        group, name, shape, ["trial", "frame", *dims], dtype=dtype, chunks=chunks, raw=True, write_empty_chunks=True
    )


def store_bytes(plan: SessionPlan) -> int:
    """About the size a session's store takes (its uncompressed trial chunks; the rest is small): checked against
    the free space before anything is written."""
    n, t = plan.num_trials, plan.t_pad
    per_frame = plan.height * plan.width + 4 * plan.num_neurons * (2 if plan.ground_truth is not None else 1)
    return n * t * per_frame


def chunk_checksum(trial_data: np.ndarray) -> int:
    """CRC-32 of one trial's chunk as the store holds it (C order, little-endian): what ``verify`` recomputes."""
    data = np.ascontiguousarray(trial_data, dtype=trial_data.dtype.newbyteorder("<"))
    return zlib.crc32(data.tobytes())


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


def write_store(  # noqa: C901 - one streaming pass over the trials, then the small arrays
    session: Session, plan: SessionPlan, dest: Path, video_dtype: Any, fingerprint: str, tick: Callable[[], None]
) -> None:
    """Write ``session`` as a store at ``dest``, trial by trial (``tick()`` after each); ``video_dtype`` uint8 raises
    :class:`NotGreyLevels` on a video that is not integer grey levels (then write again with float32)."""
    n, t_pad, n_neurons, h, w = plan.num_trials, plan.t_pad, plan.num_neurons, plan.height, plan.width
    limit = statistics_limit(plan.statistics)
    std = plan.statistics["responses"]["std"].astype(np.float64)  # (N, T_pad)
    precision = response_precision(std, dtype=np.float64).T  # (N, T_pad) -> (T_pad, N)
    root = zarr.open_group(dest, mode="w", zarr_format=3)
    videos = _per_trial(root, "videos", (n, t_pad, h, w), ["height", "width"], video_dtype)
    responses = _per_trial(root, "responses", (n, t_pad, n_neurons), ["neuron"], np.float32)
    rates = None
    if plan.ground_truth is not None:
        rates = _per_trial(root.create_group("ground_truth"), "rates", (n, t_pad, n_neurons), ["neuron"], np.float32)
    behavior = np.zeros((n, t_pad, 2), dtype=np.float32)
    pupil = np.zeros((n, t_pad, 2), dtype=np.float32)
    lengths = np.zeros(n, dtype=np.int32)
    hidden = np.zeros(n, dtype=bool)
    frames = min(t_pad, MAX_FRAMES)
    frame_means = np.full((n, frames), np.nan, dtype=np.float32)
    blocks = np.full((n, frames, BLOCKS[0] * BLOCKS[1]), np.nan, dtype=np.float32)
    types: list[str] = []
    moments = {"raw": _Moments(n_neurons), "normalized": _Moments(n_neurons)}
    checksums = {name: np.zeros(n, dtype=np.uint32) for name in ("videos", "responses", "rates")}

    for i in range(n):
        arrays = {key: session.load(f"data/{key}/{i}.npy") for key in DATA_KEYS}  # time last
        check_trial_values(arrays, session.where, i)
        length = valid_length(arrays, limit)
        lengths[i] = length
        r_src = arrays["responses"]
        hidden[i] = not np.any(r_src[~np.isnan(r_src)])
        v = arrays["videos"][..., :length].transpose(2, 0, 1)  # (H, W, T) -> (T, H, W)
        if video_dtype == np.uint8 and v.size and (v.min() < 0 or v.max() > 255 or not np.array_equal(v, np.round(v))):
            raise NotGreyLevels
        video = np.zeros((t_pad, h, w), dtype=video_dtype)
        video[:length] = v
        videos[i] = video
        checksums["videos"][i] = chunk_checksum(video)
        r = np.zeros((t_pad, n_neurons), dtype=np.float32)
        r[:length] = r_src[:, :length].T  # (N, T) -> (T, N)
        if not hidden[i]:
            responses[i] = r
            checksums["responses"][i] = chunk_checksum(r)
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
            gt = load_rates(plan.ground_truth, i)
            rt = np.zeros((t_pad, n_neurons), dtype=np.float32)
            rt[:length] = np.nan_to_num(gt[:, :length].T)
            rates[i] = rt
            checksums["rates"][i] = chunk_checksum(rt)
        tick()

    def load_video(i: int) -> np.ndarray:
        return np.asarray(videos[i, : lengths[i]])

    clip_id = group_clips(lengths.astype(np.int64), frame_means, blocks, load_video)
    bonus = np.array([t.endswith("bonus") for t in plan.tiers.tolist()])
    types = vote_within_clips(types, clip_id, bonus)

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

    sums = root.create_group("checksums")
    sums.attrs["algorithm"] = "zlib.crc32 of each trial's chunk bytes (C order, little-endian); 0 for unwritten chunks"
    for name in ("videos", "responses", *(["rates"] if rates is not None else [])):
        _create(sums, name, checksums[name], ["trial"])

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
            "created_by": CREATED_BY,
        }
    )
