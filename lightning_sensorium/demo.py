"""`make demo`: synthesise demo mice (if missing) → convert to zarr → train the factorized baseline → evaluate.

Run as ``python -m lightning_sensorium.demo [--data DIR] [--minutes M] [--precision auto|32-true|bf16-mixed]``.
Everything lands under ``--data`` (synthetic release, stores) and ``runs/`` (TensorBoard logs, checkpoints,
metrics.json).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_sensorium.data.layout import GROUND_TRUTH_DIR, TIERS

#: The demo mice: small enough to synthesise in under a minute on 2 cores, large enough to learn from.
DEMO_MICE = {"mice": 3, "neurons": 1000, "train_trials": 100, "clips_per_tier": 2, "repeats": 10, "seed": 0}
#: The demo trains the factorized baseline's recipe by default (``--config`` picks any experiment) at the size of
#: its CPU recipe, ``experiments/cpu/<model>.yaml`` layered over it (docs/training.md, "CPU recipes").
DEMO_CONFIG = "experiments/factorized.yaml"


def recipe_args(config: str | Path, full_size: bool = False) -> list[str]:
    """``--config`` arguments of an experiment followed by its CPU recipe (unless ``full_size`` or it has none)."""
    from lightning_sensorium.launch import cpu_recipe

    cpu = None if full_size else cpu_recipe(config)
    return ["--config", str(config), *(["--config", str(cpu)] if cpu else [])]


def native_bf16() -> bool:
    """Whether this machine computes bfloat16 natively: a CUDA GPU with bf16 support, else a CPU with AMX or
    AVX512-BF16 (where oneDNN runs bf16 convolutions faster than float32; elsewhere autocast emulates bf16 and is
    slower). ``torch.cpu.get_capabilities`` is not in every torch build: without it, no."""
    import torch

    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    found = capabilities() if capabilities is not None else {}
    return bool(found.get("amx_bf16") or found.get("avx512_bf16"))


def resolve_precision(precision: str) -> str:
    """``auto`` → ``bf16-mixed`` where :func:`native_bf16`, else ``32-true``; any other value as it is."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if native_bf16() else "32-true"


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


def fit_args(config: str, stores: Path, minutes: float, precision: str, full_size: bool = False) -> list[str]:
    """The ``fit`` arguments of the demo: the experiment, its CPU recipe (unless ``full_size``), a time budget."""
    minutes_part = int(minutes)
    seconds = int(round((minutes - minutes_part) * 60))
    return [
        "fit",
        *recipe_args(config, full_size),
        "--data.root",
        str(stores),
        "--trainer.max_time",
        f"00:00:{minutes_part:02d}:{seconds:02d}",
        "--trainer.max_epochs",
        "-1",  # the budget is the time: no epoch cap (the YAMLs' max_epochs count full-size epochs)
        # A CPU budget of minutes: no validation during training (evaluated after), and epochs long enough that the
        # per-epoch work of the loop is negligible (16-sample epochs cost 15 % of the steps).
        "--data.samples_per_epoch",
        "512",
        "--trainer.check_val_every_n_epoch",
        "100000",
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.precision",
        resolve_precision(precision),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_sensorium.demo", description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("data"), help="data folder (default: %(default)s)")
    parser.add_argument("--minutes", type=float, default=5.0, help="CPU minutes of training (default: %(default)s)")
    parser.add_argument("--config", default=DEMO_CONFIG, help="experiment to train (default: %(default)s)")
    parser.add_argument(
        "--full-size",
        action="store_true",
        help="train the experiment as its YAML says, without its CPU recipe experiments/cpu/<model>.yaml",
    )
    parser.add_argument(
        "--precision",
        default="auto",
        help="trainer.precision of the fit; `auto`: bf16-mixed where the machine computes bf16 natively (CPU AMX "
        "or AVX512-BF16, a bf16 GPU), else 32-true (default: %(default)s)",
    )
    parser.add_argument("--no-train", action="store_true", help="only synthesise, convert and summarise")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="-- FIT_OPTION",
        help="after `--`: more options for `fit`, applied after the CPU recipe (e.g. -- --trainer.max_steps 3000)",
    )
    ns = parser.parse_args(argv)

    stores = prepare(ns.data)
    summarise(stores)
    if ns.no_train:
        return 0

    from lightning_sensorium.callbacks.memory import InsufficientMemoryError
    from lightning_sensorium.evaluate import evaluate, print_table, write_json, write_tensorboard
    from lightning_sensorium.launch import run_lightning, with_experiment_defaults

    args = fit_args(ns.config, stores, ns.minutes, ns.precision, full_size=ns.full_size)
    try:
        cli = run_lightning(with_experiment_defaults([*args, *ns.overrides]))
    except InsufficientMemoryError as err:  # before training: say what to do instead, without a traceback
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    ckpt = cli.trainer.checkpoint_callback.best_model_path or cli.trainer.checkpoint_callback.last_model_path
    log_dir = Path(cli.trainer.logger.log_dir)
    results = evaluate(ckpt, data={"root": str(stores)}, tiers=DEMO_TIERS)
    print_table(results)
    write_json(results, log_dir / "metrics.json")
    # The run's TensorBoard page gets the final evaluation: the table, its scalars and figures (the demo runs no
    # validation during training, so the fit itself logs only training curves).
    write_tensorboard(results, log_dir)
    print(f"\nmetrics: {log_dir / 'metrics.json'}\ncheckpoint: {ckpt}")
    print(f"TensorBoard: tensorboard --logdir {log_dir.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
