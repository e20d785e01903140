"""Data efficiency of transfer on the digital twins: a new mouse fitted from scratch, on a frozen pretrained core,
and with the core fine-tuned, against the share of its training trials — scored as the fraction of the ground-truth
ceiling reached on its held-out trials.

The new mouse shares the visual system of the pretrained core's mice (the generator's one feature bank) but has new
neurons and new behaviour: a synthetic mouse of another seed. Each run is ``lightning fit`` with the pretrained
run's own ``config.yaml`` (same recipe and inputs), ``data.train_fraction`` (nested whole-clip shares) and a fixed
number of optimizer steps, then ``evaluate`` on the held-out test tiers. The fraction of the ground truth is the
pooled single-trial correlation over that of the generator's noiseless rates (docs/evaluation.md). The design
follows the limited-data studies of Lurz et al. 2021 (https://openreview.net/forum?id=Tp7kI90Htd) and
ViV1T-closed-loop's ``limit_data.py`` (https://github.com/bryanlimy/ViV1T-closed-loop).

    python benchmarks/transfer_curve.py --pretrained runs/factorized/version_0/checkpoints/last.ckpt \\
        [--fractions 0.05 0.1 0.25 0.5 1] [--neurons 1000] [--modes scratch frozen finetune] [--max-steps 300] \\
        [--work /tmp/transfer] [--out transfer.json] [--figure transfer.png] [-- <more fit options>]

Runs already in ``--out`` are not repeated (an interrupted curve resumes). ``--tiny`` shrinks everything to seconds
(the test).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from lightning_sensorium.atomic import write_text_atomic
from lightning_sensorium.data.convert import convert
from lightning_sensorium.data.synthetic import synthesize
from lightning_sensorium.evaluate import evaluate
from lightning_sensorium.launch import run_lightning

#: Held-out tiers of a synthetic mouse: labelled, with ground truth, never trained on.
HELD_OUT = ("live_test_main", "final_test_main")
MODES = ("scratch", "frozen", "finetune")


def new_mouse(work: Path, neurons: int, seed: int, train_trials: int, tiny: bool) -> Path:
    """Stores of one new synthetic mouse with ``neurons`` neurons (made once, then reused)."""
    stores = work / f"stores_n{neurons}"
    if stores.is_dir():
        return stores
    release = work / f"release_n{neurons}"
    if not release.is_dir():
        sizes = {"clips_per_tier": 2, "repeats": 3 if tiny else 10}  # the demo mice's test tiers
        synthesize(release, mice=1, neurons=neurons, train_trials=train_trials, seed=seed, progress=False, **sizes)
    convert([release], stores, progress=False)
    return stores


def fit_args(mode: str, pretrained: Path, stores: Path, fraction: float, steps: int, name: str, a: Any) -> list[str]:
    """``lightning fit`` arguments of one point of the curve."""
    run_config = pretrained.parent.parent / "config.yaml"
    args = [
        "fit",
        "--config",
        str(run_config),
        "--data.root",
        str(stores),
        "--data.mice",
        "null",
        "--data.train_fraction",
        str(fraction),
        "--trainer.max_steps",
        str(steps),
        "--trainer.max_time",
        "null",
        "--trainer.max_epochs",
        "-1",
        "--trainer.logger.init_args.save_dir",
        str(a.work / "runs"),
        "--trainer.logger.init_args.name",
        name,
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--seed_everything",
        str(a.seed),
    ]
    if mode != "scratch":
        args += ["--model.pretrained", str(pretrained)]
    if mode == "frozen":
        args += ["--model.freeze_core", "true"]
    if mode == "finetune":
        args += ["--model.core_lr", str(a.finetune_lr)]
    return [*args, *a.fit_options]


def run_point(mode: str, neurons: int, fraction: float, stores: Path, a: Any) -> dict[str, Any]:
    """Fit one new-mouse model and score it on the held-out tiers."""
    name = f"{mode}_n{neurons}_f{fraction:g}"
    start = time.perf_counter()
    cli = run_lightning(fit_args(mode, a.pretrained, stores, fraction, a.max_steps, name, a))
    seconds = time.perf_counter() - start
    ckpt = cli.trainer.checkpoint_callback.last_model_path
    trials = len(next(iter(cli.datamodule._train_trials.values())))
    results = evaluate(ckpt, tiers=list(HELD_OUT), accelerator="cpu")
    pooled = {tier: results["tiers"][tier]["pooled"] for tier in results["tiers"]}
    single = sum(p["single_trial_corr"] for p in pooled.values()) / len(pooled)
    truth = sum(p["ground_truth_corr"] for p in pooled.values()) / len(pooled)
    return {
        "mode": mode,
        "neurons": neurons,
        "fraction": fraction,
        "train_trials": trials,
        "steps": int(cli.trainer.global_step),
        "fit_seconds": round(seconds, 1),
        "single_trial_corr": single,
        "ground_truth_corr": truth,
        "fraction_of_ground_truth": single / truth,
        "checkpoint": ckpt,
    }


def plot(points: list[dict[str, Any]], path: Path) -> None:
    """Fraction of the ground truth against the share of training trials, one line per mode, a panel per count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({p["neurons"] for p in points})
    fig, axes = plt.subplots(1, len(counts), figsize=(4.2 * len(counts), 3.4), squeeze=False, sharey=True)
    for ax, n in zip(axes[0], counts, strict=True):
        for mode, colour in zip(MODES, ("0.55", "tab:blue", "tab:orange"), strict=True):
            line = sorted(
                (p["train_trials"], p["fraction_of_ground_truth"])
                for p in points
                if (p["mode"], p["neurons"]) == (mode, n)
            )
            if line:
                ax.plot(*zip(*line, strict=True), "o-", color=colour, label=mode)
        ax.set_xscale("log")
        ax.set_xlabel("training trials of the new mouse")
        ax.set_title(f"new mouse, {n} neurons")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("fraction of ground-truth ceiling\n(held-out trials)")
    axes[0][0].legend(frameon=False)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=130, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    tmp.replace(path)


def table(points: list[dict[str, Any]]) -> str:
    """Markdown: one row per (neurons, trials), one column per mode."""
    rows = sorted({(p["neurons"], p["fraction"], p["train_trials"]) for p in points})
    head = "| neurons | share | train trials | " + " | ".join(MODES) + " |\n|---|---|---|" + "---|" * len(MODES)
    lines = [head]
    for n, f, t in rows:
        cells = []
        for mode in MODES:
            hit = [p for p in points if (p["mode"], p["neurons"], p["fraction"]) == (mode, n, f)]
            cells.append(f"{hit[0]['fraction_of_ground_truth']:.3f}" if hit else "–")
        lines.append(f"| {n} | {f:g} | {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--pretrained", type=Path, required=True, help="a checkpoint of a fit (its run's config.yaml is used)"
    )
    p.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5, 1.0])
    p.add_argument("--neurons", type=int, nargs="+", default=[1000], help="neurons of the new mouse (one mouse each)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--max-steps", type=int, default=300, help="optimizer steps of every run (default: %(default)s)")
    p.add_argument("--finetune-lr", type=float, default=1e-3, help="model.core_lr of `finetune` (default: %(default)s)")
    p.add_argument("--train-trials", type=int, default=100, help="train clips of the new mouse (default: %(default)s)")
    p.add_argument("--mouse-seed", type=int, default=100, help="synthetic seed of the new mouse (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed_everything of every fit (default: %(default)s)")
    p.add_argument("--work", type=Path, default=Path("/tmp/transfer"), help="new mice, runs (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("transfer.json"))
    p.add_argument("--figure", type=Path, help="PNG of the curve")
    p.add_argument("--tiny", action="store_true", help="tiny mouse and few steps (seconds; the test)")
    p.add_argument("fit_options", nargs="*", help="after --: more `fit` options for every run")
    a = p.parse_args(argv)
    if not (a.pretrained.parent.parent / "config.yaml").is_file():
        p.error(f"--pretrained {a.pretrained}: no config.yaml in its run folder {a.pretrained.parent.parent}")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    a.work.mkdir(parents=True, exist_ok=True)
    points: list[dict[str, Any]] = json.loads(a.out.read_text())["points"] if a.out.is_file() else []
    for neurons in a.neurons:
        stores = new_mouse(a.work, neurons, a.mouse_seed, a.train_trials, a.tiny)
        for fraction in sorted(a.fractions):
            for mode in a.modes:
                if any((q["mode"], q["neurons"], q["fraction"]) == (mode, neurons, fraction) for q in points):
                    continue
                point = run_point(mode, neurons, fraction, stores, a)
                points.append(point)
                print(
                    f"{mode:>8} · {neurons} neurons · {point['train_trials']:>3} trials: "
                    f"{point['fraction_of_ground_truth']:.3f} of the ground truth ({point['fit_seconds']:.0f} s)",
                    flush=True,
                )
                write_text_atomic(a.out, json.dumps({"pretrained": str(a.pretrained), "points": points}, indent=1))
    print(table(points))
    if a.figure:
        plot(points, a.figure)
    return points


if __name__ == "__main__":
    main()
