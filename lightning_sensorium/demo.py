"""`make demo`: synthesise demo mice (if missing) → convert to zarr → train the factorized baseline → evaluate.

Run as ``python -m lightning_sensorium.demo [--data DIR] [--minutes M]``. Everything lands under ``--data``
(synthetic release, stores) and ``runs/`` (TensorBoard logs, checkpoints, metrics.json).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_sensorium.data.layout import GROUND_TRUTH_DIR, TIERS

#: The demo mice: small enough to synthesise in under a minute on 2 cores, large enough to learn from.
DEMO_MICE = {"mice": 3, "neurons": 1000, "train_trials": 100, "clips_per_tier": 2, "repeats": 10, "seed": 0}
#: The demo trains the factorized baseline's recipe ...
DEMO_CONFIG = "experiments/factorized.yaml"
#: ... at a size a 2-core CPU trains in minutes (the faithful 32/64/128 core takes 12–30 s per batch there).
#: Narrower layers (8/16/16 channels), readout positions sampled closely around μ from the start (σ init 0.1, not
#: 1.0) and one optimizer step per batch instead of per cycle over the mice: ≈ 2 s per batch of 8 × 80 frames.
DEMO_OVERRIDES: list[str] = [
    "--model.core.init_args.hidden_channels",
    "[8, 16, 16]",
    "--model.readout.init_args.init_sigma",
    "0.1",
    "--model.accumulate_over_mice",
    "false",
]
#: Tiers the demo evaluates (whole trials are slow on a CPU: ~2 s per trial for the factorized baseline).
DEMO_TIERS = ["final_test_main"]


def prepare(data: Path, progress: bool = True) -> Path:
    """Synthesise the demo mice if missing, convert them (idempotent), return the stores folder."""
    from lightning_sensorium.data.convert import convert
    from lightning_sensorium.data.synthetic import synthesize

    release, stores = data / "synthetic", data / "stores"
    sessions = sorted(p for p in release.glob("*") if p.is_dir() and p.name != GROUND_TRUTH_DIR)
    if not sessions:
        print(f"synthesising {DEMO_MICE['mice']} demo mice into {release} ...")
        sessions = synthesize(release, progress=progress, **DEMO_MICE)  # type: ignore[arg-type]
    convert([str(s) for s in sessions], stores, progress=progress)
    return stores


def summarise(stores: Path) -> None:
    """Print one row per mouse: neurons and trials per tier, clip groups, stimulus types."""
    from rich.console import Console
    from rich.table import Table

    from lightning_sensorium.data.store import MouseStore

    table = Table(title=f"stores in {stores}")
    for col in ("mouse_id", "neurons", *TIERS, "clips", "stimulus types"):
        table.add_column(col, justify="left" if col in ("mouse_id", "stimulus types") else "right")
    for path in sorted(stores.glob("*.zarr")):
        s = MouseStore(path)
        counts = [str(len(s.trials([t]))) for t in TIERS]
        types = sorted(set(s.stimulus_type_names()))
        table.add_row(s.mouse_id, str(s.num_neurons), *counts, str(len(set(s.clip_id.tolist()))), ", ".join(types))
    Console().print(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_sensorium.demo", description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("data"), help="data folder (default: %(default)s)")
    parser.add_argument("--minutes", type=float, default=5.0, help="CPU minutes of training (default: %(default)s)")
    parser.add_argument("--config", default=DEMO_CONFIG, help="experiment to train (default: %(default)s)")
    parser.add_argument("--no-train", action="store_true", help="only synthesise, convert and summarise")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="-- FIT_OPTION",
        help="after `--`: options for `fit` (default: the CPU-sized model of DEMO_OVERRIDES for the default config)",
    )
    ns = parser.parse_args(argv)

    stores = prepare(ns.data)
    summarise(stores)
    if ns.no_train:
        return 0

    from lightning_sensorium.cli import lightning_main, with_defaults
    from lightning_sensorium.evaluate import evaluate, print_table, write_json

    minutes = int(ns.minutes)
    seconds = int(round((ns.minutes - minutes) * 60))
    cli = lightning_main(
        with_defaults(
            [
                "fit",
                "--config",
                ns.config,
                "--data.root",
                str(stores),
                "--trainer.max_time",
                f"00:00:{minutes:02d}:{seconds:02d}",
                # A CPU budget of minutes: short epochs, no validation during training (evaluated after).
                "--data.samples_per_epoch",
                "16",
                "--trainer.check_val_every_n_epoch",
                "100000",
                "--trainer.num_sanity_val_steps",
                "0",
                *(ns.overrides or (DEMO_OVERRIDES if ns.config == DEMO_CONFIG else [])),
            ]
        )
    )
    ckpt = cli.trainer.checkpoint_callback.best_model_path or cli.trainer.checkpoint_callback.last_model_path
    log_dir = Path(cli.trainer.logger.log_dir)
    results = evaluate(ckpt, data={"root": str(stores)}, tiers=DEMO_TIERS)
    print_table(results)
    write_json(results, log_dir / "metrics.json")
    print(f"\nmetrics: {log_dir / 'metrics.json'}\ncheckpoint: {ckpt}")
    print(f"TensorBoard: tensorboard --logdir {log_dir.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
