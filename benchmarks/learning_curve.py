"""Learning curve in wall time: corr(prediction, noiseless rates) on held-out synthetic trials while a model trains.

Builds the model and data of an experiment config exactly as ``lightning fit`` would (the same overrides after the
config), then trains it with a plain loop — no Lightning Trainer, no validation — for ``--budget`` seconds, and every
``--every`` seconds scores it on the first ``--trials`` oracle trials per mouse (excluded from the clock):

* ``r``: correlation of the prediction with the generator's noiseless rates (per neuron over frames 50+, per mouse
  over the pooled trials, then averaged over mice): how close the model is to the ground truth,
* ``y``: the same against the recorded responses,
* ``pos``: correlation of each readout's positions with the true receptive-field centres (x, y; Gaussian readouts).

The BENCHMARKS.md sections on the factorized demo recipe compare such curves side by side (one run at a time).

``--max-steps`` with ``--every-steps`` compares recipes at equal optimizer steps instead (fair on a machine whose
speed drifts); ``--precision bf16-mixed`` trains under bf16 autocast, as the demo does on a CPU with native bf16;
``--ema DECAY [DECAY ...]`` scores an exponential moving average of the weights and buffers (the demo's ``EMA``
callback's blend) instead of the raw ones: the first decay's gives ``r``, ``y`` and ``pos``; with several, every point
also holds ``r_ema`` (decay → ``r``), so one run compares decays at equal steps.

    python benchmarks/learning_curve.py --budget 300 --every 50 --config experiments/factorized.yaml \\
        [--schedule constant|cosine|decay] [--decay-fraction 0.3] [--max-steps N --every-steps K] \\
        [--precision 32-true|bf16-mixed] [--ema DECAY ...] [--out curve.json] -- <lightning options>

The demo's model is the experiment with its CPU recipe: ``-- --config experiments/cpu/factorized.yaml``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _diagnostics import correlation

from lightning_sensorium.callbacks import BudgetDecay
from lightning_sensorium.callbacks.ema import EMAMultiAvg
from lightning_sensorium.data.layout import GROUND_TRUTH_DIR
from lightning_sensorium.launch import run_lightning, with_experiment_defaults


def score(module: Any, batches: list[dict[str, Any]], release: Path, skip: int = 50) -> dict[str, Any]:
    """``r``, ``y`` and ``pos`` (see the module docstring) of ``module`` on ``batches`` of whole trials."""
    module.eval()
    per_mouse: dict[str, list[tuple[np.ndarray, ...]]] = {}
    with torch.no_grad():
        for b in batches:
            p = module.predict_whole_trials(b)  # (B, N, T)
            for i in range(p.shape[0]):
                sl = slice(skip, int(b["length"][i]))
                trial = (p[i, :, sl].numpy(), b["rates"][i, :, sl].numpy(), b["responses"][i, :, sl].numpy())
                per_mouse.setdefault(b["mouse_id"], []).append(trial)
    module.train()
    r, y = [], []
    for trials in per_mouse.values():
        pred, rates, resp = (np.concatenate([t[k] for t in trials], axis=1) for k in range(3))  # (N, ΣT)
        r.append(correlation(pred, rates))
        y.append(correlation(pred, resp))
    out: dict[str, Any] = {"r": float(np.mean(r)), "y": float(np.mean(y))}
    positions = []
    for mouse, readout in module._require_encoder().readouts.items():
        truth = release / GROUND_TRUTH_DIR / mouse / "neurons" / "rf_center.npy"
        if hasattr(readout, "grid_predictor") and truth.exists():
            with torch.no_grad():
                mu = readout.grid_predictor(readout.source_grid).numpy()  # (N, 2) normalised x, y
            rf = np.load(truth)  # (N, 2) half-resolution px x, y
            positions.append([np.corrcoef(mu[:, k], rf[:, k])[0, 1] for k in (0, 1)])
    if positions:
        out["pos"] = np.round(np.mean(positions, axis=0), 3).tolist()
    return out


def score_with(
    module: Any, averaged: dict[str, torch.Tensor] | None, batches: list[dict[str, Any]], release: Path
) -> dict[str, Any]:
    """:func:`score` of ``module`` with the ``averaged`` weights and buffers loaded (None: its own), then its own
    weights restored."""
    if averaged is None:
        return score(module, batches, release)
    own = {k: v.detach().clone() for k, v in module.state_dict().items()}
    module.load_state_dict(averaged)
    try:
        return score(module, batches, release)
    finally:
        module.load_state_dict(own)


def factor(schedule: str, progress: float, fraction: float) -> float:
    """Learning-rate factor at ``progress`` ∈ [0, 1] of the budget."""
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "decay":  # constant, then linear to 0 over the last `fraction`: the callback's own rule
        return BudgetDecay(fraction=fraction).factor(progress)
    return 1.0


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--config", required=True, help="experiment YAML (after experiments/defaults.yaml)")
    parser.add_argument("--budget", type=float, default=300.0, help="training seconds")
    parser.add_argument("--every", type=float, default=50.0, help="seconds between scores")
    parser.add_argument("--schedule", choices=["constant", "cosine", "decay"], default="constant")
    parser.add_argument("--decay-fraction", type=float, default=0.3, help="share of the budget `decay` spends")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps too")
    parser.add_argument("--every-steps", type=int, default=None, help="score every this many steps, not seconds")
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true", help="training precision")
    parser.add_argument(
        "--ema", type=float, nargs="+", default=[], help="score EMAs of the weights with these decays (see above)"
    )
    parser.add_argument("--trials", type=int, default=4, help="oracle trials per mouse to score on")
    parser.add_argument("--data", default="data/stores", help="stores of synthetic mice")
    parser.add_argument("--release", type=Path, default=Path("data/synthetic"), help="their synthetic release")
    parser.add_argument("--out", type=Path, default=None, help="write the curve as JSON here")
    parser.add_argument("overrides", nargs="*", help="lightning options after --, e.g. --data.batch_size 4")
    args = parser.parse_args(argv)
    if not 0 < args.decay_fraction <= 1:
        parser.error(f"--decay-fraction {args.decay_fraction}: expected a share in (0, 1]")
    for decay in args.ema:
        if not 0 <= decay < 1:
            parser.error(f"--ema {decay}: expected a decay in [0, 1)")
    argv_fit = ["--config", args.config, "--data.root", args.data, *args.overrides]
    cli = run_lightning(with_experiment_defaults(argv_fit), run=False)
    module, dm = cli.model, cli.datamodule
    dm.setup("fit")
    optimizers = module.configure_optimizers()
    optimizer = optimizers["optimizer"] if isinstance(optimizers, dict) else optimizers
    base = [g["lr"] for g in optimizer.param_groups]
    batches = list(dm.trial_loader(["oracle"], max_trials=args.trials))
    if not batches or "rates" not in batches[0]:
        raise SystemExit(f"{args.data}: no oracle trials with ground-truth rates (a synthetic tree is needed)")
    curve, step, next_score = [], 0, args.every
    device = next(module.parameters()).device.type
    bf16 = args.precision == "bf16-mixed"
    state = module.state_dict(keep_vars=True)  # name → the module's own tensors
    # decay → (its blend, its averaged weights and buffers by name)
    averages = {d: (EMAMultiAvg(d), {k: v.detach().clone() for k, v in state.items()}) for d in args.ema}
    loader = iter(dm.train_dataloader())
    start = time.perf_counter()
    while True:
        try:
            batch = next(loader)
        except StopIteration:
            loader = iter(dm.train_dataloader())
            batch = next(loader)
        with torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = module.training_step(batch, step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        for blend, averaged in averages.values():
            for name, tensor in state.items():  # one tensor per call: EMAMultiAvg takes one dtype at a time
                blend([averaged[name]], [tensor.detach()], torch.zeros(()))
        elapsed = time.perf_counter() - start
        done = elapsed >= args.budget or (args.max_steps is not None and step >= args.max_steps)
        scale = factor(args.schedule, min(elapsed / args.budget, 1.0), args.decay_fraction)
        for group, lr in zip(optimizer.param_groups, base, strict=True):
            group["lr"] = lr * scale
        due = step % args.every_steps == 0 if args.every_steps else elapsed >= next_score
        if due or done:
            paused = time.perf_counter()
            first = averages[args.ema[0]][1] if args.ema else None
            point = {"t": round(elapsed), "step": step, **score_with(module, first, batches, args.release)}
            if len(args.ema) > 1:  # the first decay's r is the point's own: not scored again
                others = {d: a for d, (_, a) in averages.items() if d != args.ema[0]}
                point["r_ema"] = {str(args.ema[0]): point["r"]}
                point["r_ema"] |= {str(d): score_with(module, a, batches, args.release)["r"] for d, a in others.items()}
            start += time.perf_counter() - paused  # scoring is not training time
            curve.append(point)
            print(json.dumps(point), flush=True)
            next_score += args.every
            if done:
                break
    if args.out is not None:
        args.out.write_text(json.dumps(curve, indent=1))
    return curve


if __name__ == "__main__":
    main()
