"""`lightning-sensorium evaluate`: the official metrics of a checkpoint on whole trials, per tier and mouse.

Single-trial correlation, repeat-averaged correlation, leave-one-out oracle correlation and FEVE, per mouse and
pooled over neurons (the official neuron-weighted mean); on synthetic mice also the ground-truth oracle (the
correlation of the generator's noiseless rates with the recorded responses) and the fraction of it reached.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_sensorium.data.layout import TIERS

#: Metrics shown in the terminal table, in order.
TABLE_METRICS = (
    "single_trial_corr",
    "repeat_averaged_corr",
    "oracle_corr",
    "feve",
    "ground_truth_corr",
    "fraction_of_ground_truth",
)


def load_datamodule(ckpt: dict[str, Any], overrides: dict[str, Any]) -> Any:
    """Rebuild the datamodule a checkpoint was trained with, with ``overrides`` (e.g. another ``root``)."""
    from lightning_sensorium.data.datamodule import SensoriumDataModule

    hparams = dict(ckpt.get("datamodule_hyper_parameters", {}))
    hparams.pop("_instantiator", None)
    hparams.update({k: v for k, v in overrides.items() if v is not None})
    return SensoriumDataModule(**hparams)


def evaluate(
    ckpt_path: str | Path,
    *,
    data: dict[str, Any] | None = None,
    tiers: Sequence[str] | None = None,
    accelerator: str = "auto",
) -> dict[str, Any]:
    """Evaluate one checkpoint on ``tiers`` (default: every labelled tier present) and return the results."""
    import lightning as L

    from lightning_sensorium.module import SensoriumModule, check_neurons_match

    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    overrides = dict(data or {})
    overrides["test_tiers"] = list(tiers) if tiers else [t for t in TIERS if t != "train"]
    dm = load_datamodule(ckpt, overrides)
    model = SensoriumModule.load_from_checkpoint(ckpt_path, map_location="cpu")
    check_neurons_match(model.neurons, dm.neurons)
    trainer = L.Trainer(accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False)
    trainer.test(model, datamodule=dm, verbose=False)
    results = model.results.get("test", {})
    return {
        "checkpoint": str(ckpt_path),
        "data_root": dm.root,
        "mice": dm.mouse_ids,
        "tiers": {
            tier: {"pooled": res["pooled"], "per_mouse": res["per_mouse"]}
            for tier, res in results.items()
            if res["pooled"]
        },
    }


def write_json(results: dict[str, Any], path: str | Path) -> None:
    """Write ``results`` atomically (temporary file, then rename); NaN becomes null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(clean(results), f, indent=2)
    os.replace(tmp, path)


def print_table(results: dict[str, Any]) -> None:
    """A rich table: one row per tier (pooled) and per mouse."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"evaluate {results['checkpoint']}")
    table.add_column("tier")
    table.add_column("mouse")
    for name in TABLE_METRICS:
        table.add_column(name.replace("_", " "), justify="right")

    def fmt(v: Any) -> str:
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"

    for tier, res in results["tiers"].items():
        table.add_row(tier, "[b]pooled[/b]", *(fmt(res["pooled"].get(n)) for n in TABLE_METRICS))
        for mouse, vals in res["per_mouse"].items():
            table.add_row("", mouse, *(fmt(vals.get(n)) for n in TABLE_METRICS))
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # logs and pipes: do not squeeze mouse ids into 80 columns
    console.print(table)
