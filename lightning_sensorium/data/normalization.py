"""Input/target normalisation applied at read time, by absolute frame index.

``official`` is neuralpredictors' ``NeuroNormalizer`` as the 2023 starter kit applies it with the release's
per-frame statistics (https://github.com/sinzlab/neuralpredictors/blob/main/neuralpredictors/data/transforms.py),
the scale the competition scores; ``raw`` leaves the data as recorded (DwiseNeuro). Also here: the per-frame
response scale and time-averaged input statistics, which remove the jitter of statistics taken over few trials.
Formulas and measurements: docs/training.md, "The data module: `SensoriumDataModule`".
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

from lightning_sensorium.data.store import MouseStore

_TINY = 1e-6

InputStatistics = Literal["per_frame", "time_averaged"]


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
    returned as ``dtype``. The one implementation: the store writer, the normaliser and submissions use it.
    """
    threshold = 0.01 * np.nanmean(std)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(std > threshold, 1.0 / std, 1.0 / threshold).astype(dtype, copy=False)


class Normalizer:
    """Normalises raw time-first arrays of one mouse.

    Formulas: docs/training.md, "The data module: `SensoriumDataModule`".

    Args:
        store: the mouse.
        mode: ``official`` or ``raw``.
        input_statistics: ``per_frame`` (the official normaliser) or ``time_averaged`` (inputs normalised with
            statistics over all frames; ``official`` mode only).
    """

    def __init__(
        self,
        store: MouseStore,
        mode: Literal["official", "raw"] = "official",
        input_statistics: InputStatistics = "per_frame",
    ) -> None:
        if input_statistics not in get_args(InputStatistics):
            raise ValueError(
                f"data.input_statistics={input_statistics!r}: expected one of {list(get_args(InputStatistics))}"
            )
        if mode == "raw" and input_statistics != "per_frame":
            raise ValueError(
                f"data.input_statistics={input_statistics!r} changes the official normalisation's statistics; "
                "data.normalization is 'raw' (use official, or input_statistics: per_frame)"
            )
        self.mode = mode
        self.store = store
        self.input_statistics = input_statistics
        if mode == "raw":
            return
        stats = store.statistics
        inputs = {key: (stats[key]["mean"], stats[key]["std"]) for key in ("videos", "behavior", "pupil_center")}
        if input_statistics == "time_averaged":
            inputs = {key: over_time(mean, std) for key, (mean, std) in inputs.items()}
        self.video_mean = inputs["videos"][0].astype(np.float32)  # (T_pad, H, W)
        self.video_std = np.maximum(inputs["videos"][1], _TINY).astype(np.float32)
        self.precision = response_precision(stats["responses"]["std"])  # (T_pad, N)
        self.behavior_scale = (1.0 / np.maximum(inputs["behavior"][1], _TINY)).astype(np.float32)  # (T_pad, 2)
        self.pupil_mean = inputs["pupil_center"][0].astype(np.float32)  # (T_pad, 2)
        self.pupil_std = np.maximum(inputs["pupil_center"][1], _TINY).astype(np.float32)
        # Frames past the statistics (≥ 300) are never read (lengths are capped there); zero them once anyway so
        # a bad frame cannot turn a batch into NaN.
        for name in ("video_mean", "video_std", "precision", "behavior_scale", "pupil_mean", "pupil_std"):
            arr = getattr(self, name)
            np.nan_to_num(arr, copy=False, nan=0.0 if "mean" in name or "scale" in name else 1.0, posinf=0.0)
        # Per-frame precision over its mean across the frames that have statistics (each neuron's mean is 1): the
        # part of the official response scale that changes from frame to frame, which no stimulus explains.
        finite = np.isfinite(stats["responses"]["std"])  # (T_pad, N)
        mean_precision = np.nanmean(np.where(finite, self.precision, np.nan), axis=0)  # (N,)
        self.relative_precision = (self.precision / np.where(mean_precision > 0, mean_precision, 1.0)).astype(
            np.float32
        )
        # C-contiguous (time first), as the windows are: statistics that arrive time-last (a broadcast or
        # transposed array) made the video's normalisation 15× slower than a contiguous product.
        self.video_mean = np.ascontiguousarray(self.video_mean)
        self.video_inv_std = np.ascontiguousarray(1.0 / self.video_std, dtype=np.float32)
        self.pupil_inv_std = (1.0 / self.pupil_std).astype(np.float32)

    def __call__(self, raw: dict[str, np.ndarray], frames: np.ndarray) -> dict[str, np.ndarray]:
        """Normalise arrays read for absolute frame indices ``frames`` (all of ``raw`` covers these frames)."""
        out = {k: v.astype(np.float32, copy=False) for k, v in raw.items()}
        if self.mode == "raw":
            out["responses"] = np.maximum(out["responses"], 0.0)  # tiny negatives of deconvolution
            if "rates" in out:
                out["rates"] = np.maximum(out["rates"], 0.0)
            return out
        # Contiguous or strided frames index the statistics as a view (a slice), not a gathered copy.
        f: slice | np.ndarray = frames
        if len(frames) > 1 and np.all(np.diff(frames) == frames[1] - frames[0]) and frames[1] > frames[0]:
            f = slice(int(frames[0]), int(frames[-1]) + 1, int(frames[1] - frames[0]))
        elif len(frames) == 1:
            f = slice(int(frames[0]), int(frames[0]) + 1)
        out["videos"] = (out["videos"] - self.video_mean[f]) * self.video_inv_std[f]
        out["responses"] = out["responses"] * self.precision[f]
        if "rates" in out:
            out["rates"] = out["rates"] * self.precision[f]
        out["behavior"] = out["behavior"] * self.behavior_scale[f]
        out["pupil_center"] = (out["pupil_center"] - self.pupil_mean[f]) * self.pupil_inv_std[f]
        return out

    def response_scale(self, frames: np.ndarray) -> np.ndarray:
        """``(T, N)``: :attr:`relative_precision` at the absolute ``frames`` (official mode only)."""
        if self.mode != "official":
            raise ValueError(f"the response scale is the official normalisation's; this normaliser is {self.mode!r}")
        return self.relative_precision[frames]

    def mean_responses(self) -> np.ndarray:
        """Per-neuron mean response over train frames, on the scale the model is trained on."""
        stats = self.store.neuron_statistics
        key = "raw" if self.mode == "raw" else "normalized"
        return np.asarray(stats[key]["mean"], dtype=np.float32)
