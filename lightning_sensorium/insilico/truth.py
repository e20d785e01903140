"""What each experiment should find on a synthetic mouse, from its generator's parameters, and how close it came.

The conversions to the experiments' units (docs/insilico.md): RF centres from half-resolution to full-resolution
pixels (``2 x + 0.5``: a half-resolution pixel is the mean of a 2 × 2 block); the preferred direction is the
orientation (the wave-vector angle) for direction sign +1 and opposite for −1; SF = 1 / wavelength.
"""

from __future__ import annotations

import numpy as np

from lightning_sensorium.data import digital_twin as twin
from lightning_sensorium.insilico.experiments import Result, Variables

#: "Strongly direction selective": the motion-energy weight b and the complex share 1 − a both at least this.
STRONG_DS = 0.5


def truth_variables(params: twin.NeuronParameters, index: np.ndarray) -> Variables:
    """Per-neuron true values ``true_*`` of the neurons ``index``, in the experiments' units."""
    p = params
    direction = (p.orientation + np.where(p.direction_sign > 0, 0.0, 180.0)) % 360.0
    values = {
        "true_rf_x": 2 * p.rf_center[:, 0] + 0.5,
        "true_rf_y": 2 * p.rf_center[:, 1] + 0.5,
        "true_orientation": p.orientation,
        "true_direction": direction,
        "true_sf": 1.0 / p.wavelength,
        "true_transient": p.transient.astype(bool),
        "true_simple_index": p.simple_index,
        "true_direction_index": p.direction_index,
        "true_normalization": p.norm_weight / p.norm_sigma,
        "true_run_weight": p.run_weight,
        "true_pupil_weight": p.pupil_weight,
    }
    return {k: (("neuron",), np.asarray(v)[index]) for k, v in values.items()}


def nearest_sf(sf: np.ndarray) -> np.ndarray:
    """The generator's spatial frequency (``1 / wavelength``, cycles/px) nearest each ``sf`` on a log scale."""
    choices = 1.0 / (2.0 * np.asarray(twin.WAVELENGTHS))  # full-resolution wavelength = 2 × half-resolution
    return choices[np.abs(np.log(np.asarray(sf))[:, None] - np.log(choices)[None]).argmin(1)]


def _rank(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x)).astype(np.float64)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (no ties expected: continuous values)."""
    if len(a) < 3:
        return float("nan")
    return float(np.corrcoef(_rank(a), _rank(b))[0, 1])


def recovery(result: Result, params: twin.NeuronParameters, index: np.ndarray) -> tuple[Variables, dict[str, float]]:
    """Per-neuron errors and summary scores of ``result`` against the truth of the neurons ``index``."""
    t = {k: v for k, (_, v) in truth_variables(params, index).items()}
    per: Variables = {}
    summary: dict[str, float] = {}
    names = result.variables
    if "rf_x" in names:
        err = np.hypot(result["rf_x"] - t["true_rf_x"], result["rf_y"] - t["true_rf_y"])
        per["rf_error"] = (("neuron",), err)
        summary |= {
            "rf_error_median_px": float(np.median(err)),
            "rf_within_1px": float(np.mean(err <= 1)),
            "rf_within_2px": float(np.mean(err <= 2)),
        }
    if "pref_orientation" in names:
        ori_ok = np.isclose(result["pref_orientation"], t["true_orientation"])
        per["orientation_correct"] = (("neuron",), ori_ok)
        strong = (t["true_direction_index"] >= STRONG_DS) & (1 - t["true_simple_index"] >= STRONG_DS)
        dir_ok = np.isclose(result["pref_direction"], t["true_direction"])
        sf_ok = nearest_sf(result["pref_sf"]) == t["true_sf"]
        simple = t["true_simple_index"] > 0.5
        summary |= {
            "orientation_accuracy": float(ori_ok.mean()),
            "direction_accuracy_strong_ds": float(dir_ok[strong].mean()) if strong.any() else float("nan"),
            "strong_ds_neurons": float(strong.sum()),
            "sf_accuracy": float(sf_ok.mean()),
            "tf_transient_minus_sustained_hz": float(
                result["pref_tf"][t["true_transient"]].mean() - result["pref_tf"][~t["true_transient"]].mean()
            )
            if t["true_transient"].any() and (~t["true_transient"]).any()
            else float("nan"),
            "simple_complex_accuracy": float(np.mean((result["f1_f0"] > 1.0) == simple)),
        }
        ds_truth = t["true_direction_index"] * (1 - t["true_simple_index"])  # the motion-energy share of the drive
        for k, tf in enumerate(result["tf"]):
            summary[f"dsi_spearman_{tf:g}hz"] = spearman(result["dsi_tf"][:, k], ds_truth)
    if "suppression_index" in names:
        summary["suppression_spearman"] = spearman(result["suppression_index"], t["true_normalization"])
    for gain, weight in (("running_gain", "true_run_weight"), ("pupil_gain", "true_pupil_weight")):
        if gain in names:
            log_gain = np.log(np.maximum(result[gain], 1e-12))
            clear = np.abs(t[weight]) > 0.05
            summary[f"{gain}_sign_accuracy"] = float(np.mean(np.sign(log_gain[clear]) == np.sign(t[weight][clear])))
            summary[f"{gain}_spearman"] = spearman(log_gain, t[weight])
    return per, summary
