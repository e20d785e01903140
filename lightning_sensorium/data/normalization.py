"""Input/target normalisation applied at read time, by absolute frame index.

``official`` is neuralpredictors' ``NeuroNormalizer`` as the 2023 starter kit applies it with the per-frame
statistics of the release (https://github.com/sinzlab/neuralpredictors/blob/main/neuralpredictors/data/transforms.py):

* videos: ``(x - mean_v[t]) / std_v[t]`` per pixel and frame;
* responses: ``x * precision[t, n]`` with ``precision = 1/s`` where ``s > 0.01 * nanmean(s)`` else ``1 / (0.01 *
  nanmean(s))``, ``s = std_r[t, n]`` — no centring; this is the scale the competition scores;
* behaviour: ``x / std_b[t]`` (no centring, no threshold in the original; we floor std at a tiny value so a
  constant channel gives 0, not inf);
* pupil centre: ``(x - mean_p[t]) / std_p[t]``.

The per-frame statistics come from a finite number of train trials, so ``precision[t, n]`` jitters from frame to
frame, and the official targets carry that gain, which no stimulus explains. :meth:`Normalizer.response_scale`
gives it relative to each neuron's mean (``data.response_scale``: the module trains on the targets divided by it
and multiplies its predictions by it).

``raw`` leaves everything as recorded (DwiseNeuro trains on raw grey levels and ReLU'd raw responses).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from lightning_sensorium.data.store import MouseStore

_TINY = 1e-6


def response_precision(std: np.ndarray) -> np.ndarray:
    """Official per-frame, per-neuron response precision from the ``(T, N)`` std (NaN where std is NaN)."""
    threshold = 0.01 * np.nanmean(std)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(std > threshold, 1.0 / std, 1.0 / threshold).astype(np.float32)


class Normalizer:
    """Normalises raw time-first arrays of one mouse (see module docstring)."""

    def __init__(self, store: MouseStore, mode: Literal["official", "raw"] = "official") -> None:
        self.mode = mode
        self.store = store
        if mode == "raw":
            return
        stats = store.statistics
        self.video_mean = stats["videos"]["mean"].astype(np.float32)  # (T_pad, H, W)
        self.video_std = np.maximum(stats["videos"]["std"], _TINY).astype(np.float32)
        self.precision = response_precision(stats["responses"]["std"])  # (T_pad, N)
        self.behavior_scale = (1.0 / np.maximum(stats["behavior"]["std"], _TINY)).astype(np.float32)  # (T_pad, 2)
        self.pupil_mean = stats["pupil_center"]["mean"].astype(np.float32)  # (T_pad, 2)
        self.pupil_std = np.maximum(stats["pupil_center"]["std"], _TINY).astype(np.float32)
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
        self.video_inv_std = (1.0 / self.video_std).astype(np.float32)
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
