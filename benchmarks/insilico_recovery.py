"""How well in-silico experiments on a trained model recover the synthetic mouse's truth, by prediction quality.

Runs the same experiments (``lightning_sensorium.insilico``) on a checkpoint and on the mouse's own generator (the
reference: what the method recovers from a perfect model), scores both against the ground-truth parameters, and
splits the model's neurons into quartiles of prediction quality — the per-neuron correlation of its predictions
with the noiseless rates on ``--tier`` trials (frames ≥ ``--skip``). Reported per quartile: RF-centre error,
orientation / direction (strongly direction-selective cells) / SF accuracy, simple-vs-complex accuracy by F1/F0,
Spearman of DSI at 2 Hz with the motion-energy share, running-gain sign accuracy and Spearman with the true weight,
suppression-index Spearman with the normalisation strength (size tuning on ``--size-neurons`` neurons), and,
with ``--mei-neurons``, the generator's response to the model's MEI image relative to its best grating.

    python benchmarks/insilico_recovery.py runs/factorized/version_0/checkpoints/last.ckpt \\
        [--data data/stores] [--release data/synthetic] [--mouse ID] [--figure docs/figures/insilico_recovery.png]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _report import machine_line

from lightning_sensorium.insilico import experiments as ex
from lightning_sensorium.insilico.responders import GroundTruth, TrainedModel, load_trained
from lightning_sensorium.insilico.truth import STRONG_DS, nearest_sf, spearman, truth_variables


def prediction_quality(model: TrainedModel, tier: str, trials: int, skip: int) -> np.ndarray:
    """Per-neuron correlation ``(N,)`` of the model's predictions with the noiseless rates, frames concatenated
    over ``trials`` trials of ``tier`` (from ``skip`` on)."""
    dm = model.datamodule
    dm.setup("test")
    preds, rates = [], []
    with torch.no_grad():
        for batch in dm.trial_loader([tier], max_trials=trials):
            if batch["mouse_id"] != model.mouse_id:
                continue
            if "rates" not in batch:
                raise SystemExit(f"{tier}: no ground-truth rates in the stores (a synthetic mouse is needed)")
            p = model.model.predict_whole_trials(batch)  # (B, N, T)
            for i in range(p.shape[0]):
                length = int(batch["length"][i])
                preds.append(p[i, :, skip:length].numpy())
                rates.append(batch["rates"][i, :, skip:length].numpy())
    a, b = np.concatenate(preds, 1), np.concatenate(rates, 1)  # (N, frames)
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / (np.sqrt((a * a).sum(1) * (b * b).sum(1)) + 1e-12)


def scores(results: dict[str, ex.Result], truth: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, float]:
    """Recovery scores of the neurons ``rows`` (indices into the experiments' neurons)."""
    rf, tuning, behavior = results["rf"], results["tuning"], results["behavior"]
    t = {k: v[rows] for k, v in truth.items()}
    err = np.hypot(rf["rf_x"][rows] - t["true_rf_x"], rf["rf_y"][rows] - t["true_rf_y"])
    strong = (t["true_direction_index"] >= STRONG_DS) & (1 - t["true_simple_index"] >= STRONG_DS)
    k2 = int(np.argmin(np.abs(tuning["tf"] - 2.0)))
    direction_ok = np.isclose(tuning["pref_direction"][rows], t["true_direction"])
    motion_share = t["true_direction_index"] * (1 - t["true_simple_index"])
    run, weight = np.log(np.maximum(behavior["running_gain"][rows], 1e-12)), t["true_run_weight"]
    clear = np.abs(weight) > 0.05
    return {
        "neurons": float(len(rows)),
        "rf_error_median_px": float(np.median(err)),
        "rf_within_2px": float(np.mean(err <= 2)),
        "orientation_acc": float(np.mean(np.isclose(tuning["pref_orientation"][rows], t["true_orientation"]))),
        "direction_acc_strong_ds": float(np.mean(direction_ok[strong])) if strong.any() else float("nan"),
        "sf_acc": float(np.mean(nearest_sf(tuning["pref_sf"][rows]) == t["true_sf"])),
        "simple_complex_acc": float(np.mean((tuning["f1_f0"][rows] > 1) == (t["true_simple_index"] > 0.5))),
        "dsi_spearman_2hz": spearman(tuning["dsi_tf"][rows, k2], motion_share),
        "running_sign_acc": float(np.mean(np.sign(run[clear]) == np.sign(weight[clear]))),
        "running_spearman": spearman(run, weight),
    }


def run_all(responder: Any, ids: np.ndarray, batch_size: int) -> dict[str, ex.Result]:
    common = {"batch_size": batch_size, "progress": True}
    return {
        "rf": ex.receptive_fields(responder, ids, **common),
        "tuning": ex.grating_tuning(responder, ids, **common),
        "behavior": ex.behavior_modulation(responder, ids, **common),
    }


def size_scores(responder: Any, res: dict[str, ex.Result], truth: dict[str, np.ndarray], rows: np.ndarray) -> float:
    """Spearman of the suppression index with the true normalisation strength on the neurons ``rows``."""
    rf, tuning = res["rf"], res["tuning"]
    size = ex.size_tuning(
        responder,
        rf.unit_ids[rows],
        centers=np.stack([rf["rf_x"], rf["rf_y"]], 1)[rows],
        directions=tuning["pref_direction"][rows],
        sf=tuning["pref_sf"][rows],
        tf=tuning["pref_tf"][rows],
        progress=True,
    )
    return spearman(size["suppression_index"], truth["true_normalization"][rows])


def mei_transfer(
    model: TrainedModel, gt: GroundTruth, gt_tuning: ex.Result, rows: np.ndarray, steps: int
) -> dict[str, float]:
    """Medians over the neurons ``rows``: the generator's response to the model's MEI image (flashed) and video
    relative to its response to its own preferred grating at the same RMS contrast (full field, contrast
    budget·√2), and the model's MEI activations relative to its best natural clip."""
    from lightning_sensorium.insilico.mei import flash_onset, most_exciting_inputs
    from lightning_sensorium.insilico.stimuli import grating

    ids = gt_tuning.unit_ids[rows]
    budget, frames, window = 0.25, 40, 10
    mei = most_exciting_inputs(model, ids, frames=frames, window=window, steps=steps, seeds=1, budget=budget)
    canvas = ex.canvas_of(gt)
    onset = flash_onset(frames, window)
    flashed = []
    for img in mei["mei_image"]:
        video = canvas.blank(frames)
        video[onset:] = img
        flashed.append(video)
    contrast = budget * np.sqrt(2.0)  # a sinusoid's RMS is its amplitude / √2
    gratings = [
        grating(
            canvas, frames, gt_tuning["pref_direction"][r], gt_tuning["pref_sf"][r], gt_tuning["pref_tf"][r], contrast
        )
        for r in rows
    ]
    settle = frames - window

    def own(videos: list[np.ndarray]) -> np.ndarray:  # neuron i's response to stimulus i
        return np.diag(ex.clip_responses(gt, videos, ids, settle=settle)["clip_response"])

    reference = np.maximum(own(gratings), 1e-12)
    return {
        "generator_image_mei_vs_grating": float(np.median(own(flashed) / reference)),
        "generator_video_mei_vs_grating": float(np.median(own(list(mei["mei_video"])) / reference)),
        "model_image_mei_vs_natural": float(np.median(mei["image_vs_natural"])),
        "model_video_mei_vs_natural": float(np.median(mei["video_vs_natural"])),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("ckpt", nargs="+", help="checkpoint(s) (several = their ensemble)")
    parser.add_argument("--data", default="data/stores", help="stores of the synthetic mice")
    parser.add_argument("--release", type=Path, default=Path("data/synthetic"), help="their synthetic release")
    parser.add_argument("--mouse", help="mouse to study (default: the first)")
    parser.add_argument("--tier", default="final_test_main", help="trials that measure prediction quality")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--skip", type=int, default=60, help="leading frames left out of the quality")
    parser.add_argument("--size-neurons", type=int, default=64, help="neurons in the size-tuning experiment")
    parser.add_argument("--mei-neurons", type=int, default=0, help="neurons whose MEI is tested on the generator")
    parser.add_argument("--gradient-neurons", type=int, default=0, help="neurons mapped by gradient RF too")
    parser.add_argument("--mei-steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    parser.add_argument("--figure", type=Path, help="write the recovery-vs-quality figure here (PNG)")
    args = parser.parse_args(argv)
    start = time.time()
    mouse = args.mouse or sorted(p.name[: -len(".zarr")] for p in Path(args.data).glob("*.zarr"))[0]
    model = load_trained(args.ckpt, mouse, {"root": args.data}, args.device)
    gt = GroundTruth.from_release(args.release, mouse)
    if not np.array_equal(gt.unit_ids, model.unit_ids):
        raise SystemExit(f"{mouse}: the release's neurons differ from the checkpoint's")
    quality = prediction_quality(model, args.tier, args.trials, args.skip)
    ids = model.unit_ids
    truth = {k: v for k, (_, v) in truth_variables(gt.params, np.arange(len(ids))).items()}
    on_model, on_truth = run_all(model, ids, args.batch_size), run_all(gt, ids, args.batch_size)
    edges = np.quantile(quality, [0, 0.25, 0.5, 0.75, 1.0])
    bins = np.clip(np.searchsorted(edges, quality, side="right") - 1, 0, 3)
    table: dict[str, dict[str, float]] = {"generator (all)": scores(on_truth, truth, np.arange(len(ids)))}
    table["model (all)"] = scores(on_model, truth, np.arange(len(ids)))
    for q in range(4):
        rows = np.flatnonzero(bins == q)
        table[f"model Q{q + 1} r∈[{edges[q]:.2f},{edges[q + 1]:.2f}]"] = scores(on_model, truth, rows)
    best = np.argsort(-quality)[: args.size_neurons]
    size = {"generator": size_scores(gt, on_truth, truth, best), "model": size_scores(model, on_model, truth, best)}
    out: dict[str, Any] = {"mouse": mouse, "quality_mean": float(quality.mean()), "table": table, "size": size}
    if args.gradient_neurons:
        rows = best[: args.gradient_neurons]
        grad = ex.gradient_receptive_fields(model, ids[rows], batch_size=args.batch_size, progress=True)
        err = {
            "gradient": np.hypot(grad["rf_x"] - truth["true_rf_x"][rows], grad["rf_y"] - truth["true_rf_y"][rows]),
            "sparse_noise": np.hypot(
                on_model["rf"]["rf_x"][rows] - truth["true_rf_x"][rows],
                on_model["rf"]["rf_y"][rows] - truth["true_rf_y"][rows],
            ),
        }
        out["rf_error_median_px_best"] = {k: float(np.median(v)) for k, v in err.items()}
    if args.mei_neurons:
        out["mei_transfer"] = mei_transfer(model, gt, on_truth["tuning"], best[: args.mei_neurons], args.mei_steps)
    out["seconds"] = time.time() - start
    print(f"\n{machine_line('insilico_recovery.py', argv)}\n")
    print(f"mouse {mouse}: {len(ids)} neurons, prediction quality r(pred, noiseless rates) mean {quality.mean():.3f}\n")
    cols = list(next(iter(table.values())))
    print("| neurons | " + " | ".join(cols[1:]) + " | n |")
    print("|---" * len(cols) + "|---|")
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{row[c]:.2f}" for c in cols[1:]) + f" | {int(row['neurons'])} |")
    print(f"\nsuppression index vs normalisation strength (Spearman, {len(best)} best-predicted neurons): {size}")
    if "rf_error_median_px_best" in out:
        best_rf = out["rf_error_median_px_best"]
        print(f"RF-centre error, {args.gradient_neurons} best-predicted neurons (median px): {best_rf}")
    if "mei_transfer" in out:
        print(f"MEI images of {args.mei_neurons} best-predicted neurons (medians): {out['mei_transfer']}")
    print(f"total {out['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    if args.figure:
        figure(quality, on_model, truth, args.figure)
    return out


def figure(quality: np.ndarray, res: dict[str, ex.Result], truth: dict[str, np.ndarray], path: Path) -> None:
    """RF-centre error, orientation correctness and running gain against prediction quality, one dot per neuron."""
    import matplotlib.pyplot as plt

    from lightning_sensorium import figures  # noqa: F401  (Agg backend)

    err = np.hypot(res["rf"]["rf_x"] - truth["true_rf_x"], res["rf"]["rf_y"] - truth["true_rf_y"])
    ori = np.isclose(res["tuning"]["pref_orientation"], truth["true_orientation"])
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), layout="constrained")
    axes[0].scatter(quality, np.minimum(err, 20), s=3, alpha=0.5)
    axes[0].set_ylabel("RF-centre error (px, ≤ 20)")
    order = np.argsort(quality)
    window = max(10, len(quality) // 10)
    smooth = np.convolve(ori[order].astype(float), np.ones(window) / window, mode="valid")
    axes[1].plot(quality[order][window - 1 :], smooth)
    axes[1].set_ylabel(f"orientation accuracy\n(running mean of {window})")
    axes[1].set_ylim(0, 1.05)
    axes[2].scatter(truth["true_run_weight"], np.log(res["behavior"]["running_gain"]), s=3, c=quality, cmap="viridis")
    axes[2].set_xlabel("true running weight")
    axes[2].set_ylabel("log running gain (model; colour: quality)")
    for ax in axes[:2]:
        ax.set_xlabel("prediction quality r(pred, noiseless rates)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
