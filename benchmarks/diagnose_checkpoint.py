"""Where a trained model falls short of the synthetic ground truth: by temporal frequency, by lag, and in its shifter.

Predicts the first ``--trials`` trials per mouse of a tier with a checkpoint and compares the predictions with the
generator's noiseless rates (``rates`` in the batches of a synthetic tree; correlations per neuron over frames
``--skip`` onwards, averaged over neurons and trials):

* for a model trained without ``data.response_scale``: the correlation of its predictions times the per-frame
  response scale (the official targets' gain per neuron and frame, from the release's per-frame statistics),
* the correlation with the predictions shifted by a few frames (a timing error peaks away from 0),
* the correlation and the power of prediction and rates in temporal frequency bands (a model that only gets the
  slow part right has a falling correlation and a vanishing power ratio at high frequencies),
* for encoders with shifters: the correlation of each mouse's learned shift with the ground-truth gaze shift, and
  the score when the shifter is replaced by the least-squares linear map from the normalised pupil centre to the
  ground-truth shift (what a perfect shifter would add) or by its mean (what the shifter adds at all).

    python benchmarks/diagnose_checkpoint.py CKPT [--data data/stores] [--release data/synthetic] [--trials 4]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _diagnostics import correlation
from torch import Tensor, nn

from lightning_sensorium.data import digital_twin as twin
from lightning_sensorium.data.layout import GROUND_TRUTH_DIR
from lightning_sensorium.ensemble import load_ensemble

BANDS_HZ = ((0.0, 0.5), (0.5, 1.0), (1.0, 2.0), (2.0, 4.0), (4.0, 15.0))
LAGS = (-4, -2, -1, 0, 1, 2, 4)
FPS = 30.0


def band(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``x (N, T)`` with only its temporal frequencies in ``[lo, hi)`` Hz (30 Hz frames)."""
    spectrum = np.fft.rfft(x - x.mean(-1, keepdims=True), axis=-1)
    f = np.fft.rfftfreq(x.shape[-1], 1 / FPS)
    above = f > hi if hi >= FPS / 2 else f >= hi  # the top band keeps the Nyquist frequency
    spectrum[..., (f < lo) | above] = 0
    return np.fft.irfft(spectrum, n=x.shape[-1], axis=-1)


class LinearShift(nn.Module):
    """Pupil centre ``(..., 2)`` → ``x @ A + c``: a fixed linear shifter."""

    def __init__(self, a: np.ndarray, c: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("a", torch.tensor(a, dtype=torch.float32))
        self.register_buffer("c", torch.tensor(c, dtype=torch.float32))

    def forward(self, pupil_center: Tensor) -> Tensor:
        return pupil_center @ self.a + self.c


def predict(module: Any, batches: list[dict[str, Any]], skip: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(prediction, rates)`` ``(N, L − skip)`` per trial."""
    out = []
    with torch.no_grad():
        for b in batches:
            p = module.predict_whole_trials(b)  # (B, N, T)
            for i in range(p.shape[0]):
                length = int(b["length"][i])
                out.append((p[i, :, skip:length].numpy(), b["rates"][i, :, skip:length].numpy()))
    return out


def score(module: Any, batches: list[dict[str, Any]], skip: int) -> float:
    """Mean over trials of :func:`correlation` (prediction, rates)."""
    return float(np.mean([correlation(p, r) for p, r in predict(module, batches, skip)]))


def shifter_report(module: Any, batches: list[dict[str, Any]], release: Path, skip: int) -> dict[str, Any]:
    """Learned vs ground-truth gaze shift per mouse, then the score with a linear ground-truth shifter and with none
    (the shifts are compared in normalised units of a feature map that spans the screen, as the demo's does)."""
    encoder = module._require_encoder()
    if encoder.shifters is None:
        print("  no shifters")
        return {}
    means: dict[str, np.ndarray] = {}
    out: dict[str, Any] = {"corr": {}, "slope": {}}
    for mouse in sorted({b["mouse_id"] for b in batches}):
        gt = release / GROUND_TRUTH_DIR / mouse / "neurons"
        gain, reference = float(np.load(gt / "gaze_gain.npy")), np.load(gt / "eye_reference.npy")
        pupil, target, learned = [], [], []
        for b in (b for b in batches if b["mouse_id"] == mouse):
            for i in range(b["video"].shape[0]):
                length, trial = int(b["length"][i]), int(b["trial"][i])
                raw = np.load(release / mouse / "data" / "pupil_center" / f"{trial}.npy")[:, :length].T  # (L, 2)
                x = b["pupil_center"][i, :, :length].T  # (L, 2) normalised
                pupil.append(x.numpy())
                # half-resolution px of the ground truth → normalised units of a map spanning the screen
                target.append(gain * (raw - reference) * 2 / (np.array([twin.FEAT_W, twin.FEAT_H]) - 1))
                with torch.no_grad():
                    learned.append(encoder.shifters[mouse](x).numpy())
        x, y, s = (np.concatenate(v) for v in (pupil, target, learned))
        corr = [np.corrcoef(s[:, k], y[:, k])[0, 1] for k in (0, 1)]
        slope = [np.polyfit(y[:, k], s[:, k], 1)[0] for k in (0, 1)]
        print(
            f"  {mouse}: learned vs ground-truth shift corr x {corr[0]:.3f} y {corr[1]:.3f}, "
            f"slope x {slope[0]:.2f} y {slope[1]:.2f}"
        )
        out["corr"][mouse], out["slope"][mouse] = corr, slope
        design = np.c_[x, np.ones(len(x))]
        coef = np.linalg.lstsq(design, y, rcond=None)[0]  # (3, 2)
        offset = coef[2] - (design @ coef).mean(0) + s.mean(0)  # keep the learned mean shift: μ absorbed it
        encoder.shifters[mouse] = LinearShift(coef[:2], offset)
        means[mouse] = s.mean(0)
    out["linear_ground_truth"] = score(module, batches, skip)
    print(f"  linear ground-truth shifter: corr {out['linear_ground_truth']:.3f}")
    for mouse, mean in means.items():
        encoder.shifters[mouse] = LinearShift(np.zeros((2, 2)), mean)
    out["constant"] = score(module, batches, skip)
    print(f"  constant shift (no gaze):    corr {out['constant']:.3f}")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("ckpt", help="checkpoint to diagnose")
    parser.add_argument("--data", default="data/stores", help="stores folder of the synthetic mice")
    parser.add_argument("--release", type=Path, default=Path("data/synthetic"), help="their synthetic release")
    parser.add_argument("--tier", default="final_test_main")
    parser.add_argument("--trials", type=int, default=4, help="trials per mouse")
    parser.add_argument("--skip", type=int, default=60, help="leading frames left out (≥ 50 + the largest lag)")
    args = parser.parse_args(argv)
    ensemble, dm = load_ensemble([args.ckpt], {"root": args.data})
    module = ensemble.members[0]
    dm.setup("test")
    batches = list(dm.trial_loader([args.tier], max_trials=args.trials))
    if not batches or "rates" not in batches[0]:
        raise SystemExit(f"{args.data}: no {args.tier} trials with ground-truth rates (a synthetic tree is needed)")
    pairs = predict(module, batches, args.skip)
    print(f"{args.ckpt}: {len(pairs)} {args.tier} trials, corr(prediction, noiseless rates) per neuron")
    results: dict[str, Any] = {"overall": float(np.mean([correlation(p, r) for p, r in pairs])), "bands": []}
    print(f"  overall {results['overall']:.3f}")
    m = max(abs(k) for k in LAGS)
    lagged = {
        k: float(np.mean([correlation(p[:, m + k : p.shape[1] - m + k], r[:, m : r.shape[1] - m]) for p, r in pairs]))
        for k in LAGS
    }
    if dm.normalization == "official" and not dm.response_scale:  # what `data.response_scale` would add
        scales = [
            dm.normalizers[b["mouse_id"]].relative_precision[args.skip : int(length)].T  # (N, L − skip)
            for b in batches
            for length in b["length"]
        ]
        results["times_response_scale"] = float(
            np.mean([correlation(p * s, r) for (p, r), s in zip(pairs, scales, strict=True)])
        )
        print(f"  × per-frame response scale (data.response_scale) {results['times_response_scale']:.3f}")
    results["lags"] = lagged
    print("  prediction shifted by k frames: " + ", ".join(f"{k:+d}: {v:.3f}" for k, v in lagged.items()))
    for lo, hi in BANDS_HZ:
        parts = [(band(p, lo, hi), band(r, lo, hi)) for p, r in pairs]
        power_p, power_r = (float(np.mean([(x[j] ** 2).mean() for x in parts])) for j in (0, 1))
        corr = float(np.mean([correlation(a, b) for a, b in parts]))
        results["bands"].append({"hz": (lo, hi), "corr": corr, "power_rates": power_r, "power_prediction": power_p})
        print(f"  {lo:>4}–{hi:<4} Hz: corr {corr:.3f}, power of rates {power_r:.4f}, of prediction {power_p:.4f}")
    results["shifter"] = shifter_report(module, batches, args.release, args.skip)
    return results


if __name__ == "__main__":
    main()
