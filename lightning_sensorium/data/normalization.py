"""Input/target normalisation applied at read time, by absolute frame index, and the competition's scale.

``official`` is neuralpredictors' ``NeuroNormalizer`` as the 2023 starter kit applies it with the release's
per-frame statistics (https://github.com/sinzlab/neuralpredictors/blob/main/neuralpredictors/data/transforms.py),
the scale the competition scores; ``raw`` leaves the data as recorded (DwiseNeuro); ``viv1t`` is ViV1T's
``transform_mode=2`` with its own statistics over the train tier (``stat_mode=1``,
https://github.com/bryanlimy/ViV1T/blob/main/src/viv1t/data/data.py). Whatever a model trains on, the trials it
is scored on (``scored`` reads) carry targets on the competition's scale — raw responses × the official per-frame
precision, no ReLU — and, where the model predicts another scale, the factor that takes its predictions there.
Also here: the per-frame response scale and time-averaged input statistics, which remove the jitter of statistics
taken over few trials. Formulas and measurements: docs/training.md, "The data module: `SensoriumDataModule`".
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

from lightning_sensorium.atomic import atomic_file
from lightning_sensorium.data.store import MouseStore

log = logging.getLogger(__name__)

_TINY = 1e-6

#: What a model is trained on (``data.normalization``).
Normalization = Literal["official", "raw", "viv1t"]
InputStatistics = Literal["per_frame", "time_averaged"]

#: Bump when :func:`viv1t_statistics` changes what it computes: older cache files are recomputed.
_VIV1T_CACHE_VERSION = 1
#: ViV1T's ``MAX_FRAME``: its statistics and precision are cut there
#: (https://github.com/bryanlimy/ViV1T/blob/main/src/viv1t/data/constants.py).
_VIV1T_MAX_FRAME = 300


def over_time(mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame ``(T, ...)`` mean and std pooled over the frames that have them: the mean and std over all frames
    of all trials (``E[x] = mean_t m_t``, ``E[x²] = mean_t (s_t² + m_t²)``), broadcast back to ``(T, ...)``."""
    finite = np.isfinite(mean) & np.isfinite(std)
    m = np.where(finite, mean, np.nan).astype(np.float64)
    second = np.where(finite, np.square(std) + np.square(m), np.nan)
    with np.errstate(invalid="ignore"):
        pooled_mean = np.nanmean(m, axis=0)  # (...,)
        pooled_std = np.sqrt(np.maximum(np.nanmean(second, axis=0) - np.square(pooled_mean), 0.0))
    shape = mean.shape
    return (
        np.broadcast_to(pooled_mean, shape).astype(np.float32),
        np.broadcast_to(pooled_std, shape).astype(np.float32),
    )


def response_precision(std: np.ndarray, dtype: npt.DTypeLike = np.float32) -> np.ndarray:
    """The official response precision from the per-frame, per-neuron std (any shape, e.g. ``(T, N)``).

    ``1 / std`` where ``std > 0.01 * nanmean(std)``, else ``1 / (0.01 * nanmean(std))``; a NaN std (frames without
    statistics) takes the second branch, so the precision is never NaN. Computed in ``std``'s precision and
    returned as ``dtype``. The one implementation: the store writer, the normaliser and ViV1T's own statistics use
    it (ViV1T's ``compute_response_precision`` is the same formula on its own std).
    """
    threshold = 0.01 * np.nanmean(std)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(std > threshold, 1.0 / std, 1.0 / threshold).astype(dtype, copy=False)


def official_precision(store: MouseStore) -> np.ndarray:
    """``(T_stats, N)``: the official per-frame precision of ``store`` — the competition's scale is raw responses
    times this. Raises ValueError naming the mouse when the store has no usable response statistics or when they
    end before its longest trial."""
    try:
        std = np.asarray(store.statistics["responses"]["std"])  # its own dtype: the precision as it always was
    except (KeyError, OSError, ValueError) as err:  # absent (KeyError) or unreadable (the store's own errors)
        raise ValueError(
            f"mouse {store.mouse_id}: no readable statistics/responses/std in the store ({type(err).__name__}: "
            f"{err}), so the competition's scale (raw responses × the official per-frame precision) cannot apply; "
            "convert the release again"
        ) from err
    if std.ndim != 2 or std.shape[1] != store.num_neurons or not np.any(np.isfinite(std) & (std > 0)):
        raise ValueError(
            f"mouse {store.mouse_id}: statistics/responses/std {std.shape} holds no positive std for its "
            f"{store.num_neurons} neurons: the competition's scale cannot apply"
        )
    longest = int(store.length.max(initial=0))
    if std.shape[0] < longest:
        raise ValueError(
            f"mouse {store.mouse_id}: the response statistics cover frames 0–{std.shape[0] - 1}, its trials reach "
            f"frame {longest - 1}: frames {std.shape[0]}–{longest - 1} have no precision, so the competition's "
            "scale cannot apply"
        )
    return response_precision(std)


# --------------------------------------------------------------------------------------------- ViV1T's statistics
def _viv1t_cache_path(store: MouseStore) -> Path | None:
    """``<root>/<mouse_id>.zarr.viv1t-statistics.npz`` beside a local store (not a store: loaders never read it);
    None for URLs."""
    if store.remote:
        return None
    path = Path(store.path)
    return path.parent / f"{path.name}.viv1t-statistics.npz"


def _viv1t_cache_key(store: MouseStore) -> str:
    """What the cached statistics depend on: the store's source and layout."""
    keys = ("source_fingerprint", "format_version", "num_trials", "num_neurons", "t_pad")
    return json.dumps({"version": _VIV1T_CACHE_VERSION, **{k: store.attrs.get(k) for k in keys}}, sort_keys=True)


def _compute_viv1t_statistics(store: MouseStore) -> dict[str, np.ndarray]:
    """One pass over the train trials: per-frame sums in float64, then ViV1T's statistics (see
    :func:`viv1t_statistics`)."""
    trials = store.trials("train")
    trials = trials[~store.hidden[trials]]
    if trials.size == 0:
        raise ValueError(
            f"mouse {store.mouse_id}: no train trial with responses; data.normalization: viv1t computes ViV1T's "
            "statistics over the train tier"
        )
    t = min(store.t_pad, _VIV1T_MAX_FRAME)
    h, w = store.video_shape
    n = store.num_neurons
    count = np.zeros(t, dtype=np.int64)
    v_sum, v_sq = np.zeros((t, h, w)), np.zeros((t, h, w))
    r_sum, r_sq = np.zeros((t, n)), np.zeros((t, n))
    limits = {
        key: (np.full((t, 2), np.inf), np.full((t, 2), -np.inf)) for key in ("behavior", "pupil_center")
    }  # (min, max) per frame and signal
    for trial in trials:
        length = min(int(store.length[trial]), t)
        x = store.read(int(trial), 0, length)
        count[:length] += 1
        v = x["videos"].astype(np.float64)  # (L, H, W)
        v_sum[:length] += v
        v_sq[:length] += v * v
        r = x["responses"].astype(np.float64)  # (L, N)
        r_sum[:length] += r
        r_sq[:length] += r * r
        for key, (lo, hi) in limits.items():
            np.minimum(lo[:length], x[key], out=lo[:length])
            np.maximum(hi[:length], x[key], out=hi[:length])
    seen = count > 0
    c = np.maximum(count, 1).astype(np.float64)

    def mean_std(total: np.ndarray, square: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shape = (t,) + (1,) * (total.ndim - 1)
        mean = total / c.reshape(shape)
        std = np.sqrt(np.maximum(square / c.reshape(shape) - mean * mean, 0.0))  # population std (np.nanstd)
        empty = ~seen.reshape(shape)
        return np.where(empty, np.nan, mean), np.where(empty, np.nan, std)

    video_mean, video_std = mean_std(v_sum, v_sq)
    _, response_std = mean_std(r_sum, r_sq)
    precision = response_precision(response_std, dtype=np.float64)  # (t, N)
    # Each neuron's mean over every train frame, on ViV1T's scale (raw × its precision): Σ_t p_t·S_t / Σ_t count_t.
    response_mean = (precision * r_sum).sum(0) / max(int(count.sum()), 1)  # (N,)
    out = {
        "count": count,
        "video_mean": video_mean,
        "video_std": video_std,
        "response_std": response_std,
        "response_mean": response_mean,
    }
    for key, (lo, hi) in limits.items():
        out[f"{key}_min"] = np.where(seen[:, None], lo, np.nan)
        out[f"{key}_max"] = np.where(seen[:, None], hi, np.nan)
    return {k: v if k == "count" else v.astype(np.float32) for k, v in out.items()}


def viv1t_statistics(store: MouseStore) -> dict[str, np.ndarray]:
    """ViV1T's own per-frame statistics of ``store`` (its ``stat_mode=1``), cached beside the store.

    As https://github.com/bryanlimy/ViV1T/blob/main/src/viv1t/data/statistics.py (``compute_statistics``,
    ``measure(..., axis=-1)``, ``crop``): over the trials of the ``train`` tier, each frame over the trials that
    have it (population std), frames ≥ 300 dropped, NaN where no train trial has the frame. Returned time first,
    ``t = min(t_pad, 300)`` frames: ``video_mean``, ``video_std`` ``(t, H, W)``; ``response_std`` ``(t, N)``;
    ``behavior_min``/``_max``, ``pupil_center_min``/``_max`` ``(t, 2)``; ``count`` ``(t,)`` train trials per
    frame; ``response_mean`` ``(N,)`` each neuron's mean over all train frames on ViV1T's response scale. One read
    of every train trial; the result is kept in ``<root>/<mouse_id>.zarr.viv1t-statistics.npz`` (keyed by the
    store's source fingerprint and layout) so later runs skip the read; a read-only folder only costs the read every
    time.
    """
    cache = _viv1t_cache_path(store)
    key = _viv1t_cache_key(store)
    if cache is not None and cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as f:
                if str(f["key"]) == key:
                    return {k: f[k] for k in f.files if k != "key"}
        except (OSError, ValueError, KeyError) as err:  # unreadable or foreign: recompute
            log.info("%s: ignoring the cached ViV1T statistics (%s)", cache, err)
    stats = _compute_viv1t_statistics(store)
    if cache is not None:
        try:
            with atomic_file(cache) as tmp, open(tmp, "wb") as f:
                np.savez(f, key=np.array(key), **stats)  # type: ignore[arg-type]  # the stub types **kwds as allow_pickle
        except OSError as err:  # a read-only data folder: computed again next time
            log.info("%s: could not cache ViV1T's statistics (%s)", cache, err)
    return stats


def _inverse(denominator: np.ndarray) -> np.ndarray:
    """``1 / denominator``; 0 within ``_TINY`` of 0 (a constant signal gives 0, not inf), NaN where it is NaN."""
    d = denominator.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.abs(d) > _TINY, 1.0 / d, np.where(np.isnan(d), np.nan, 0.0)).astype(np.float32)


def _leading_finite(*arrays: np.ndarray) -> int:
    """Frames of the leading run where every element of every ``(T, ...)`` array is finite."""
    finite = np.ones(arrays[0].shape[0], dtype=bool)
    for a in arrays:
        finite &= np.isfinite(a.reshape(a.shape[0], -1)).all(1)
    return int(np.argmin(finite)) if not finite.all() else len(finite)


class Normalizer:
    """Normalises raw time-first arrays of one mouse: model inputs, training targets and scored targets.

    Inputs are ``(x − shift[t]) · gain[t]`` per frame (:attr:`inputs`; none with ``raw``). Training targets are
    the model's scale: ``official`` raw × official precision, ``raw`` ReLU'd raw, ``viv1t`` raw × ViV1T's
    precision. Scored targets (``scored`` reads, what validation, ``evaluate``, ``submit`` and ``infer`` read) are
    the competition's scale for every mode, with a ``response_scale`` ``(T, N)`` that takes the model's
    predictions there where they are on another scale. Formulas: docs/training.md, "The data module".

    Args:
        store: the mouse.
        mode: ``official``, ``raw`` or ``viv1t``.
        input_statistics: ``per_frame`` (the official normaliser) or ``time_averaged`` (inputs normalised with
            statistics over all frames; ``official`` mode only).
        response_scale: add the official per-frame precision over each neuron's mean to every read (``official``
            mode only; ``data.response_scale``).
    """

    def __init__(
        self,
        store: MouseStore,
        mode: Normalization = "official",
        input_statistics: InputStatistics = "per_frame",
        response_scale: bool = False,
    ) -> None:
        if mode not in get_args(Normalization):
            raise ValueError(f"data.normalization={mode!r}: expected one of {list(get_args(Normalization))}")
        if input_statistics not in get_args(InputStatistics):
            raise ValueError(
                f"data.input_statistics={input_statistics!r}: expected one of {list(get_args(InputStatistics))}"
            )
        if mode != "official" and input_statistics != "per_frame":
            raise ValueError(
                f"data.input_statistics={input_statistics!r} changes the official normalisation's statistics; "
                f"data.normalization is {mode!r} (use official, or input_statistics: per_frame)"
            )
        if mode != "official" and response_scale:
            raise ValueError(
                f"data.response_scale is the official normalisation's per-frame factor; "
                f"data.normalization is {mode!r} (use official, or response_scale: false)"
            )
        self.mode = mode
        self.store = store
        self.input_statistics = input_statistics
        self.scale_responses = response_scale
        #: ``(T, N)`` the official precision: the competition's scale is raw × this, whatever the model trains on.
        self.precision = official_precision(store)
        #: Input transform ``(x − shift) · gain`` per frame: ``video_shift``/``video_gain`` ``(T, H, W)``,
        #: ``behavior_*`` and ``pupil_*`` ``(T, 2)``; empty for ``raw``.
        self.inputs: dict[str, np.ndarray] = {}
        #: Frames of the leading run that have input statistics (user stimuli use their time average after).
        self.input_frames = store.t_pad
        #: ``(T, N)`` training targets = raw × this (``official``, ``viv1t``); None: ReLU'd raw (``raw``).
        self.target_precision: np.ndarray | None = None
        #: ``(T, N)`` model scale → competition's scale, for scored reads; None where they are the same.
        self.to_competition: np.ndarray | None = None
        if mode == "official":
            self._official_inputs(store)
            self.target_precision = self.precision
        elif mode == "viv1t":
            self._viv1t(store)
        else:
            self.to_competition = self.precision
        for name, arr in self.inputs.items():
            # Frames past the statistics (≥ 300) are never read (lengths are capped there); a NaN statistic passes
            # its input through (shift 0, gain 1) so a bad frame cannot turn a batch into NaN. C-contiguous (time
            # first), as the windows are: statistics that arrive time-last made the video's normalisation 15×
            # slower than a contiguous product.
            fill = 1.0 if name.endswith("_gain") else 0.0
            self.inputs[name] = np.ascontiguousarray(np.nan_to_num(arr, nan=fill, posinf=0.0, neginf=0.0))
        if mode == "official":
            # Per-frame precision over its mean across the frames that have statistics (each neuron's mean is 1):
            # the part of the official response scale that changes from frame to frame, which no stimulus explains.
            finite = np.isfinite(store.statistics["responses"]["std"])  # (T_pad, N)
            mean_precision = np.nanmean(np.where(finite, self.precision, np.nan), axis=0)  # (N,)
            self.relative_precision = (self.precision / np.where(mean_precision > 0, mean_precision, 1.0)).astype(
                np.float32
            )

    def _official_inputs(self, store: MouseStore) -> None:
        """NeuroNormalizer's inputs: videos ``(x − mean) / std``, behaviour ``x / std``, pupil ``(x − mean) / std``."""
        stats = store.statistics
        raw_stats = {key: (stats[key]["mean"], stats[key]["std"]) for key in ("videos", "behavior", "pupil_center")}
        self.input_frames = _leading_finite(*(a for pair in raw_stats.values() for a in pair))
        inputs = raw_stats
        if self.input_statistics == "time_averaged":
            inputs = {key: over_time(mean, std) for key, (mean, std) in raw_stats.items()}
        self.inputs = {
            "video_shift": inputs["videos"][0].astype(np.float32),
            "video_gain": (1.0 / np.maximum(inputs["videos"][1], _TINY)).astype(np.float32),
            "behavior_shift": np.zeros_like(inputs["behavior"][1], dtype=np.float32),
            "behavior_gain": (1.0 / np.maximum(inputs["behavior"][1], _TINY)).astype(np.float32),
            "pupil_shift": inputs["pupil_center"][0].astype(np.float32),
            "pupil_gain": (1.0 / np.maximum(inputs["pupil_center"][1], _TINY)).astype(np.float32),
        }

    def _viv1t(self, store: MouseStore) -> None:
        """ViV1T's ``transform_mode=2`` with its own statistics (``MovieDataset.transform_video``,
        ``transform_response``, ``transform_behavior``, ``transform_pupil_center`` in
        https://github.com/bryanlimy/ViV1T/blob/main/src/viv1t/data/data.py): videos ``(x − mean) / (std − mean)``
        (its ``v_min``/``v_max`` are the statistics' ``mean`` and ``std``), behaviour and pupil centre per-frame
        min–max ``(x − min) / (max − min)``, responses × its precision (the official formula on its own std)."""
        stats = viv1t_statistics(store)
        t_pad, t = store.t_pad, len(stats["count"])

        def padded(a: np.ndarray) -> np.ndarray:  # (t, ...) → (T_pad, ...), NaN past ViV1T's 300 frames
            return np.concatenate([a, np.full((t_pad - t, *a.shape[1:]), np.nan, a.dtype)]) if t < t_pad else a

        self.input_frames = _leading_finite(stats["video_mean"], stats["video_std"])
        self.inputs = {
            "video_shift": padded(stats["video_mean"]),
            "video_gain": padded(_inverse(stats["video_std"] - stats["video_mean"])),
            "behavior_shift": padded(stats["behavior_min"]),
            "behavior_gain": padded(_inverse(stats["behavior_max"] - stats["behavior_min"])),
            "pupil_shift": padded(stats["pupil_center_min"]),
            "pupil_gain": padded(_inverse(stats["pupil_center_max"] - stats["pupil_center_min"])),
        }
        target = response_precision(padded(stats["response_std"]))  # (T_pad, N), never NaN
        self.target_precision = target
        self.to_competition = (self.precision / target).astype(np.float32)
        self.viv1t_response_mean = stats["response_mean"]

    def __call__(self, raw: dict[str, np.ndarray], frames: np.ndarray, scored: bool = True) -> dict[str, np.ndarray]:
        """Normalise arrays read for absolute frame indices ``frames`` (all of ``raw`` covers these frames).

        ``scored``: a read that is scored (whole evaluation trials): ``responses`` and ``rates`` on the competition's
        scale, plus ``response_scale`` ``(T, N)`` where the model predicts another scale. Otherwise (training
        windows) ``responses`` on the model's scale."""
        out = {k: v.astype(np.float32, copy=False) for k, v in raw.items()}
        # Contiguous or strided frames index the statistics as a view (a slice), not a gathered copy.
        f: slice | np.ndarray = frames
        if len(frames) > 1 and np.all(np.diff(frames) == frames[1] - frames[0]) and frames[1] > frames[0]:
            f = slice(int(frames[0]), int(frames[-1]) + 1, int(frames[1] - frames[0]))
        elif len(frames) == 1:
            f = slice(int(frames[0]), int(frames[0]) + 1)
        if self.inputs:
            i = self.inputs
            out["videos"] = (out["videos"] - i["video_shift"][f]) * i["video_gain"][f]
            out["behavior"] = (out["behavior"] - i["behavior_shift"][f]) * i["behavior_gain"][f]
            out["pupil_center"] = (out["pupil_center"] - i["pupil_shift"][f]) * i["pupil_gain"][f]
        if scored:
            out.update(self._competition_scale(out, f))
        elif self.target_precision is None:
            out["responses"] = np.maximum(out["responses"], 0.0)  # tiny negatives of deconvolution (DwiseNeuro)
        else:
            out["responses"] = out["responses"] * self.target_precision[f]
        if self.scale_responses:
            out["response_scale"] = self.relative_precision[f]
        return out

    def _competition_scale(self, raw: dict[str, np.ndarray], f: slice | np.ndarray) -> dict[str, np.ndarray]:
        """The one home of "to the competition's scale": targets (and ground-truth rates) = raw × official
        precision, no ReLU; the model's predictions × ``response_scale`` where they are on another scale."""
        p = self.precision[f]  # (T, N)
        out = {"responses": raw["responses"] * p}
        if "rates" in raw:
            out["rates"] = raw["rates"] * p
        if self.to_competition is not None:
            out["response_scale"] = self.to_competition[f]
        return out

    def mean_responses(self) -> np.ndarray:
        """Per-neuron mean response over train frames, on the scale the model is trained on."""
        if self.mode == "viv1t":
            return np.asarray(self.viv1t_response_mean, dtype=np.float32)
        stats = self.store.neuron_statistics
        key = "raw" if self.mode == "raw" else "normalized"
        return np.asarray(stats[key]["mean"], dtype=np.float32)
