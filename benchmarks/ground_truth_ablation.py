"""Which parts of the synthetic ground truth carry the response variance a model has to predict.

For the ``final_test_main`` trials of one synthetic mouse, recomputes the generator's noiseless responses (the
calcium-observed rates) with one part of the ground-truth model switched off, and reports the correlation of each
ablated trace with the full one (per neuron over frames 50 onwards, averaged over neurons and trials). A part
whose ablation leaves the correlation near 1 explains little of the within-trial variance; the lower it drops, the
more a model loses by not capturing it. The parts are those of ``lightning_sensorium.data.digital_twin``:

* ``no_gaze``: RFs fixed at their resting position (no eye movements),
* ``no_behaviour_gain``: gain 1 (running speed and pupil size ignored),
* ``exponent_1``: a linear output nonlinearity (``d^p`` → ``d``, at about the same scale),
* ``pool_constant`` / ``pool_global``: the normalisation pool replaced by its mean / by its frame mean,
* ``gain_only``: the behaviour gain alone (no stimulus drive at all).

And what limits even a perfect model that sees the data as our loaders give it:

* ``per_frame_video_stats`` / ``per_frame_pupil_stats``: the ground truth driven by the video (pupil centre) as the
  official per-frame normalisation presents it, mapped back to grey levels (camera px) with the statistics averaged
  over time — the frame-indexed "ghost" that ``data.input_statistics: time_averaged`` removes,
* ``gaze_after_calcium``: each step's eye position applied to the rates of all past steps, then the calcium kernel
  — what a model whose temporal filters all come before a per-frame readout shift can at best compute,
* ``scan_phase_unknown``: the noiseless trace averaged over the 8 Hz scan phase, which no model input reveals.

    python benchmarks/ground_truth_ablation.py [--data data/synthetic] [--mouse SESSION] [--trials 6]
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _diagnostics import correlation

from lightning_sensorium.data import digital_twin as twin
from lightning_sensorium.data.layout import GROUND_TRUTH_DIR
from lightning_sensorium.data.normalization import over_time
from lightning_sensorium.data.synthetic import load_neuron_parameters

Rates = Callable[[twin.FeatureBank, np.ndarray, np.ndarray], np.ndarray]
Observed = Callable[[np.ndarray, np.ndarray, np.ndarray, float], np.ndarray]


def ablations(params: twin.NeuronParameters) -> dict[str, Rates]:
    """``name → (bank, behavior (T, 2), pupil_center (T, 2)) → 15 Hz rate (N, S)``: the generator's own
    :func:`~lightning_sensorium.data.digital_twin.step_rates` (``full``) and each ablation of it."""

    def full(bank: twin.FeatureBank, behavior: np.ndarray, center: np.ndarray) -> np.ndarray:
        return twin.step_rates(bank, params, behavior, center)

    def no_gaze(bank: twin.FeatureBank, behavior: np.ndarray, center: np.ndarray) -> np.ndarray:
        resting = np.broadcast_to(params.eye_reference, center.shape)  # the eye never leaves its resting position
        return twin.step_rates(bank, params, behavior, resting)

    def no_behaviour_gain(bank: twin.FeatureBank, behavior: np.ndarray, center: np.ndarray) -> np.ndarray:
        return full(bank, behavior, center) / twin.behaviour_gain(params, behavior)  # the gain is a factor

    # d instead of d^p, divided by the p-th root of the calibrated mean of d^p: about the same scale.
    linear = dataclasses.replace(
        params, exponent=np.ones_like(params.exponent), drive_mean=params.drive_mean ** (1 / params.exponent)
    )

    def exponent_1(bank: twin.FeatureBank, behavior: np.ndarray, center: np.ndarray) -> np.ndarray:
        return twin.step_rates(bank, linear, behavior, center)

    def pooled(pool: Callable[[np.ndarray], np.ndarray]) -> Rates:
        def f(bank: twin.FeatureBank, behavior: np.ndarray, center: np.ndarray) -> np.ndarray:
            replaced = twin.FeatureBank(bank.quadrature, np.ascontiguousarray(pool(bank.pool), dtype=np.float32))
            return twin.step_rates(replaced, params, behavior, center)

        return f

    def gain_only(bank: twin.FeatureBank, behavior: np.ndarray, center: np.ndarray) -> np.ndarray:
        return params.target_mean[:, None] * twin.behaviour_gain(params, behavior)

    return {
        "full": full,
        "no_gaze": no_gaze,
        "no_behaviour_gain": no_behaviour_gain,
        "exponent_1": exponent_1,
        "pool_constant": pooled(lambda q: np.full_like(q, q.mean())),  # (h, w, S) pool → its mean
        "pool_global": pooled(lambda q: np.broadcast_to(q.mean((0, 1), keepdims=True), q.shape)),  # frame means
        "gain_only": gain_only,
    }


def _statistics(folder: Path, key: str) -> tuple[np.ndarray, ...]:
    """``(mean_t, std_t, mean, std)`` of release statistics ``key``, time first ``(T_pad, ...)``: per frame (frames
    without statistics filled with the pooled value) and pooled over time (``normalization.over_time``)."""
    stats = folder / "meta" / "statistics" / key / "all"
    mean_t, std_t = (np.moveaxis(np.load(stats / f"{s}.npy"), -1, 0) for s in ("mean", "std"))  # (T_pad, ...)
    mean, std = over_time(mean_t, std_t)
    return np.where(np.isfinite(mean_t), mean_t, mean), np.where(np.isfinite(std_t), std_t, std), mean, std


def model_limits(params: twin.NeuronParameters, folder: Path) -> dict[str, Observed]:
    """``name → (frames, behavior, center, phase) → noiseless trace (N, T)``: the ``full`` model observed with scan
    phase ``phase`` (in frames), and the views of it a perfect model is limited to (see the module docstring)."""
    video_stats, pupil_stats = _statistics(folder, "videos"), _statistics(folder, "pupil_center")  # read once

    def observe(rate: np.ndarray, length: int, phase: float) -> np.ndarray:
        calcium, interp = twin._observation_matrices(length, phase)  # (S, K), (K, T)
        return rate @ calcium @ interp  # (N, T)

    def full(frames: np.ndarray, behavior: np.ndarray, center: np.ndarray, phase: float) -> np.ndarray:
        return observe(twin.step_rates(twin.feature_bank(frames), params, behavior, center), len(frames), phase)

    def per_frame_video_stats(frames: np.ndarray, behavior: np.ndarray, center: np.ndarray, phase: float) -> np.ndarray:
        mean_t, std_t, mean, std = (x[: len(frames)] for x in video_stats)  # (T, H, W)
        seen = ((frames - mean_t) / std_t * std + mean).astype(np.float32)
        return full(seen, behavior, center, phase)

    def per_frame_pupil_stats(frames: np.ndarray, behavior: np.ndarray, center: np.ndarray, phase: float) -> np.ndarray:
        mean_t, std_t, mean, std = (x[: len(frames)] for x in pupil_stats)  # (T, 2)
        return full(frames, behavior, (center - mean_t) / std_t * std + mean, phase)

    def gaze_after_calcium(frames: np.ndarray, behavior: np.ndarray, center: np.ndarray, phase: float) -> np.ndarray:
        bank = twin.feature_bank(frames)
        steps = np.arange(bank.steps)
        calcium, interp = twin._observation_matrices(len(frames), phase)  # (S, K), (K, T)
        lags = min(bank.steps, 30)  # 30 steps = 2 s ≈ 7 calcium time constants
        past = []  # past[l][:, s]: the rate of step s − l seen with the eye position of step s
        for lag in range(lags):
            idx = np.maximum(steps - lag, 0)
            shifted = twin.FeatureBank(
                np.ascontiguousarray(bank.quadrature[..., idx]), np.ascontiguousarray(bank.pool[..., idx])
            )
            past.append(twin.step_rates(shifted, params, behavior, center))  # (N, S)
        samples = np.zeros((len(params.channel), calcium.shape[1]))  # (N, K)
        for k in range(calcium.shape[1]):
            weights = np.flatnonzero(calcium[:, k])
            now = weights.max()  # the last step that reaches sample k
            for s in weights:
                samples[:, k] += calcium[s, k] * past[min(now - s, lags - 1)][:, now]
        return samples @ interp

    def scan_phase_unknown(frames: np.ndarray, behavior: np.ndarray, center: np.ndarray, phase: float) -> np.ndarray:
        rate = twin.step_rates(twin.feature_bank(frames), params, behavior, center)
        period = twin.FPS / twin.SCAN_HZ
        return np.mean([observe(rate, len(frames), p) for p in np.linspace(0, period, 16, endpoint=False)], axis=0)

    return {
        "full": full,
        "per_frame_video_stats": per_frame_video_stats,
        "per_frame_pupil_stats": per_frame_pupil_stats,
        "gaze_after_calcium": gaze_after_calcium,
        "scan_phase_unknown": scan_phase_unknown,
    }


def load_trial(folder: Path, trial: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(video (T, H, W) grey levels, behavior (T, 2), pupil_center (T, 2))`` of one release trial, cut to its
    length (the video's last valid frame is partly NaN in the release: filled with the mean grey)."""
    video = np.load(folder / "data" / "videos" / f"{trial}.npy")  # (H, W, T_pad), NaN after the trial
    length = int(np.isfinite(video[-1, -1]).sum())
    frames = np.nan_to_num(video[..., :length].transpose(2, 0, 1), nan=twin.VIDEO_MEAN)  # (T, H, W)
    behavior = np.load(folder / "data" / "behavior" / f"{trial}.npy")[:, :length].T  # (T, 2)
    center = np.load(folder / "data" / "pupil_center" / f"{trial}.npy")[:, :length].T  # (T, 2)
    return frames, behavior, center


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/synthetic"), help="synthetic release folder")
    parser.add_argument("--mouse", default=None, help="session folder name (default: the first one)")
    parser.add_argument("--trials", type=int, default=6, help="final_test_main trials to use")
    parser.add_argument("--skip", type=int, default=50, help="leading frames left out, as the metrics do")
    args = parser.parse_args(argv)
    sessions = sorted(p.name for p in args.data.iterdir() if p.is_dir() and p.name != GROUND_TRUTH_DIR)
    if not sessions:
        raise SystemExit(f"{args.data}: no session folders")
    session = args.mouse or sessions[0]
    params = load_neuron_parameters(args.data, session)
    folder = args.data / session
    tiers = np.load(folder / "meta" / "trials" / "tiers.npy")
    trials = [i for i, t in enumerate(tiers) if t == "final_test_main"][: args.trials]
    variants, limits = ablations(params), model_limits(params, folder)
    scores: dict[str, list[float]] = {name: [] for name in [*variants, *limits] if name != "full"}
    for i in trials:
        frames, behavior, center = load_trial(folder, i)
        bank = twin.feature_bank(frames)

        def observed(rate: np.ndarray, length: int = len(frames), seed: int = i) -> np.ndarray:
            # The noiseless half of `observe`; the same seed gives every variant the same scan phase.
            rates, _ = twin.observe(rate, params, length, np.random.default_rng(seed))
            return rates[:, args.skip :]  # (N, T − skip)

        full = observed(variants["full"](bank, behavior, center))
        for name in variants:
            if name != "full":
                scores[name].append(correlation(full, observed(variants[name](bank, behavior, center))))
        phase = float(np.random.default_rng(i).uniform(0, twin.FPS / twin.SCAN_HZ))  # `observe`'s first draw
        exact = limits["full"](frames, behavior, center, phase)[:, args.skip :]
        for name in limits:
            if name != "full":
                scores[name].append(correlation(exact, limits[name](frames, behavior, center, phase)[:, args.skip :]))
    means = {name: float(np.mean(values)) for name, values in scores.items()}
    print(f"{session}: {len(trials)} final_test_main trials, corr(full, ablated) per neuron, frames {args.skip}+")
    for name, value in means.items():
        print(f"  {name:<22} {value:.3f}")
    return means


if __name__ == "__main__":
    main()
