"""`make demo`: synthesise demo mice (if missing) → convert to zarr → train the factorized baseline → evaluate.

Run as ``python -m lightning_sensorium.demo [--data DIR] [--minutes M] [--precision auto|32-true|bf16-mixed]``.
Everything lands under ``--data`` (synthetic release, stores) and ``runs/`` (TensorBoard logs, checkpoints,
metrics.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_sensorium.data.layout import GROUND_TRUTH_DIR, TIERS

#: The demo mice: small enough to synthesise in under a minute on 2 cores, large enough to learn from.
DEMO_MICE = {"mice": 3, "neurons": 1000, "train_trials": 100, "clips_per_tier": 2, "repeats": 10, "seed": 0}
#: The demo trains the factorized baseline's recipe by default (``--config`` picks any experiment) ...
DEMO_CONFIG = "experiments/factorized.yaml"
_CORE = "model.core.init_args."
#: ... at a size a 2-core CPU trains in minutes: per experiment, the options (option → value) that shrink its model
#: and fit its schedule to a budget of minutes; the rest of the recipe (loss, optimiser, data mode) is the YAML's.
#: The faithful models take 10–70 s per batch on 2 cores (BENCHMARKS.md); these 0.5–5 s.
#:
#: * Factorized baseline: 8/16/16 channels (not 32/64/128), the first layer at spatial stride 2 and every layer
#:   zero-padded (so the later layers and the readout work on an 18 × 32 grid that covers the whole screen: the
#:   valid convolutions lose 9 pixels on every side, where many receptive fields lie), every 2nd frame
#:   (``frame_step: 2``, 40 frames = the same 80-frame span at half the cost; the synthetic cells, like the real
#:   ones, are slow next to 30 Hz), whole trials predicted phase by phase, readout positions sampled closely around
#:   μ from the start (σ init 0.1, not 1.0), learning rate 0.01, one optimizer step per batch instead of per cycle
#:   over the mice, and the per-frame response scale (``data.response_scale``: the official targets carry a gain per
#:   neuron and frame from the release's per-frame statistics, which the model cannot see in the video; it trains on
#:   the targets divided by it and its predictions are multiplied by it), inputs normalised with statistics averaged
#:   over time (``data.input_statistics``: the per-frame ones jitter, a fixed "ghost" movie), and the rate smoothed
#:   after the readout by a learned causal kernel over 10 steps (``CalciumELU1``: the indicator's kinetics act after
#:   the eye shift; it learns a ~0.3-s decay), which lets the first temporal kernel be 7 steps instead of 11. Where
#:   the machine computes bf16 natively the fit runs in bf16-mixed (``--precision auto``: 1.4× the steps on an AMX
#:   CPU) with the readout, shifter and activation in float32 (``model.float32_readout``: bf16 rounding of the
#:   readout cost 2 points of the ground truth, float32 there costs no steps), and the model evaluated with an EMA of
#:   its weights (decay 0.99, a ~100-step average: +1.3 points at equal steps at a constant learning rate).
#: * GRU baseline: 4 channels × 4 rotations, an 8-channel GRU with 5×5 kernels, ``frame_step: 2``.
#: * DwiseNeuro: 4 blocks of 16–32 channels, expansion 3, a 128/256 cortex, batches of 8; warm-up and cosine over
#:   ~200 steps; EMA decay 0.95 (0.999 averages over more steps than the budget has); windows every 15 frames.
#: * Dynamic-V1FM: 2 blocks of 32 channels, 2 heads, 4 × 7 × 7 windows, batches of 8, a 20-step warm-up.
#: * ViV1T: 32-dimensional tokens, 4 heads × 8, 2 spatial + 2 temporal blocks, spatial stride 4, 80-frame crops,
#:   batches of 8, one optimizer step per batch.
DEMO_OVERRIDES: dict[str, dict[str, str]] = {
    "experiments/factorized.yaml": {
        _CORE + "hidden_channels": "[8, 16, 16]",
        _CORE + "padding": "true",
        _CORE + "input_stride": "2",
        "model.readout.init_args.init_sigma": "0.1",
        "model.accumulate_over_mice": "false",
        "model.optimizer.init_args.lr": "0.01",
        "data.frame_step": "2",
        "data.frames": "40",
        "data.response_scale": "true",
        "data.input_statistics": "time_averaged",
        "model.output_activation": json.dumps(
            {"class_path": "lightning_sensorium.models.CalciumELU1", "init_args": {"taps": 10}}
        ),
        _CORE + "temporal_input_kernel": "7",
        "model.float32_readout": "true",
        # Appended to the experiment's callbacks; the checkpoint and the evaluation hold the averaged weights. The
        # experiment's PlateauRestore never acts here: the demo runs no validation (docs/training.md, EMA).
        "trainer.callbacks+": json.dumps(
            {"class_path": "lightning_sensorium.callbacks.EMA", "init_args": {"decay": 0.99}}
        ),
    },
    "experiments/gru.yaml": {
        _CORE + "hidden_channels": "4",
        _CORE + "num_rotations": "4",
        _CORE + "gru_channels": "8",
        _CORE + "gru_input_kernel": "5",
        _CORE + "gru_rec_kernel": "5",
        "model.readout.init_args.init_sigma": "0.1",
        "model.accumulate_over_mice": "false",
        "data.frame_step": "2",
        "data.frames": "40",
    },
    "experiments/dwiseneuro.yaml": {
        _CORE + "features": "[16, 16, 32, 32]",
        _CORE + "spatial_strides": "[2, 1, 2, 1]",
        _CORE + "expansion": "3",
        _CORE + "se_reduction": "4",
        _CORE + "cortex_features": "[128, 256]",
        "model.scheduler.init_args.warmup_steps": "20",
        "model.scheduler.init_args.total_steps": "200",
        "model.eval_stride": "15",
        "data.batch_size": "8",
        "trainer.callbacks": json.dumps(
            [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
                {"class_path": "lightning_sensorium.callbacks.EMA", "init_args": {"decay": 0.95}},
                {"class_path": "lightning_sensorium.callbacks.CutMix", "init_args": {"alpha": 1.0, "prob": 0.5}},
            ]
        ),
    },
    "experiments/dynamic_v1fm.yaml": {
        _CORE + "embed_dim": "32",
        _CORE + "num_blocks": "2",
        _CORE + "num_heads": "2",
        _CORE + "mlp_hidden": "64",
        _CORE + "window_size": "[4, 7, 7]",
        "model.scheduler.init_args.warmup_steps": "20",
        "data.batch_size": "8",
    },
    "experiments/viv1t.yaml": {
        _CORE + "dim": "32",
        _CORE + "heads": "4",
        _CORE + "head_dim": "8",
        _CORE + "ff_dim": "48",
        _CORE + "spatial_depth": "2",
        _CORE + "temporal_depth": "2",
        _CORE + "spatial_stride": "4",
        "model.accumulate_over_mice": "false",
        "data.frames": "80",
        "data.batch_size": "8",
    },
}


def demo_overrides(config: str) -> list[str]:
    """``DEMO_OVERRIDES[config]`` as command-line arguments (none for an experiment without an entry)."""
    from lightning_sensorium.cli import cli_args

    return cli_args(DEMO_OVERRIDES.get(config, {}))


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_sensorium.demo", description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("data"), help="data folder (default: %(default)s)")
    parser.add_argument("--minutes", type=float, default=5.0, help="CPU minutes of training (default: %(default)s)")
    parser.add_argument("--config", default=DEMO_CONFIG, help="experiment to train (default: %(default)s)")
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
        help="after `--`: options for `fit` (default: the CPU-sized model of DEMO_OVERRIDES for the config)",
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
                "--trainer.max_epochs",
                "-1",  # the budget is the time: no epoch cap (the YAMLs' max_epochs count full-size epochs)
                # A CPU budget of minutes: no validation during training (evaluated after), and epochs long enough
                # that the per-epoch work of the loop is negligible (16-sample epochs cost 15 % of the steps).
                "--data.samples_per_epoch",
                "512",
                "--trainer.check_val_every_n_epoch",
                "100000",
                "--trainer.num_sanity_val_steps",
                "0",
                "--trainer.precision",
                resolve_precision(ns.precision),
                *(ns.overrides or demo_overrides(ns.config)),
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
