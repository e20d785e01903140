"""`lightning-sensorium evaluate`: the official metrics of a checkpoint (or an ensemble) on whole trials.

Single-trial correlation (the competition score), repeat-averaged correlation, leave-one-out oracle correlation and
FEVE, per tier and mouse, pooled over neurons (the official neuron-weighted mean); bonus tiers (and any tier mixing
stimulus families) also per stimulus type; on synthetic mice also the ground-truth oracle (the correlation of the
generator's noiseless rates with the recorded responses) and the fraction of it reached. Several checkpoints are
evaluated as their ensemble (mean firing rate). Outputs: a terminal table, JSON, Markdown, TensorBoard (text,
scalars, a per-stimulus-type bar chart and per-neuron correlation-vs-oracle scatter plots).

The numbers come from :class:`~lightning_sensorium.scoring.TierScores`, which ``score`` uses for submission files too,
and are on the competition's scale (raw responses × the official per-frame precision, no ReLU) whatever the
checkpoints were trained on: the whole-trial batches carry those targets and the factor that takes a raw- or
ViV1T-scale model's predictions there (:mod:`lightning_sensorium.data.normalization`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_sensorium import figures
from lightning_sensorium.atomic import write_text_atomic
from lightning_sensorium.data.layout import TIERS
from lightning_sensorium.scoring import TierScores, nan_to_none

#: Metrics shown in the tables, in order.
TABLE_METRICS = (
    "single_trial_corr",
    "repeat_averaged_corr",
    "oracle_corr",
    "feve",
    "ground_truth_corr",
    "fraction_of_ground_truth",
)


def _scoring_writer(scorer: TierScores) -> Any:
    """A Lightning prediction writer that feeds every predicted batch (with its targets) to ``scorer``."""
    from lightning_sensorium.callbacks.prediction_writer import BatchSink

    def sink(prediction: Any, batch: Any) -> None:
        scorer.update(
            batch["mouse_id"],
            batch["tier"],
            batch["trial"],
            prediction["prediction"],
            batch["responses"],
            batch["length"],
            batch.get("rates"),
        )

    return BatchSink(sink)


def evaluate(
    ckpt_path: str | Path | Sequence[str | Path],
    *,
    data: dict[str, Any] | None = None,
    tiers: Sequence[str] | None = None,
    accelerator: str = "auto",
    max_trials: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate one checkpoint, or the ensemble of several, on ``tiers`` (default: every labelled tier but train).

    ``max_trials`` caps the trials per mouse and tier (the first ones in store order) for a quick CPU estimate.
    Hidden (all-zero) test trials are never scored.
    """
    from lightning_sensorium.ensemble import load_ensemble
    from lightning_sensorium.inference import run_predict_loop

    paths = [ckpt_path] if isinstance(ckpt_path, str | Path) else list(ckpt_path)
    if max_trials is not None and max_trials < 1:
        raise ValueError(f"max_trials {max_trials}: expected a positive number of trials per mouse and tier")
    model, dm = load_ensemble(paths, data)
    tiers = list(tiers) if tiers else [t for t in TIERS if t != "train"]
    unknown = [t for t in tiers if t not in TIERS]
    if unknown:
        raise ValueError(f"tiers: unknown tier(s) {unknown}; expected some of {list(TIERS)}")
    trials: dict[str, dict[str, np.ndarray]] = {}
    for tier in tiers:
        per_mouse = {m: dm.selected_trials(m, tier, skip_hidden=True, max_trials=max_trials) for m in dm.mouse_ids}
        per_mouse = {m: t for m, t in per_mouse.items() if t.size}
        if per_mouse:
            trials[tier] = per_mouse
    results: dict[str, Any] = {
        "checkpoint": str(paths[0]) if len(paths) == 1 else f"ensemble of {len(paths)} checkpoints",
        "checkpoints": [str(p) for p in paths],
        "data_root": dm.root,
        "mice": dm.mouse_ids,
        "normalization": dm.normalization,
        "input_statistics": dm.input_statistics,
        "max_trials": max_trials,
        "tiers": {},
    }
    if not trials:
        return results
    scorer = TierScores(dm.stores, trials, skip_frames=model.skip_frames)
    loader = dm.trial_loader(list(trials), skip_hidden=True, max_trials=max_trials)
    run_predict_loop(model, loader, [_scoring_writer(scorer)], accelerator=accelerator, progress=progress)
    results["tiers"] = scorer.compute()
    results["_vectors"] = scorer.vectors  # per-neuron values for figures; not written to JSON
    return results


# ------------------------------------------------------------------------------------------------------ outputs
def write_json(results: dict[str, Any], path: str | Path) -> None:
    """Write ``results`` atomically (temporary file, then rename); NaN becomes null."""
    public = {k: v for k, v in results.items() if not k.startswith("_")}
    write_text_atomic(path, json.dumps(nan_to_none(public), indent=2))


def _rows(results: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(tier label, mouse label, values) rows: per tier pooled, per mouse, then per stimulus type pooled."""
    rows = []
    for tier, res in results["tiers"].items():
        rows.append((tier, "pooled", res["pooled"]))
        rows += [("", mouse, vals) for mouse, vals in res["per_mouse"].items()]
        for stim, sub in res.get("per_stimulus_type", {}).items():
            rows.append((f"{tier} · {stim}", "pooled", sub["pooled"]))
    return rows


def _subject(results: dict[str, Any]) -> str:
    """What was evaluated: the checkpoint(s), or the submission file ``score`` read."""
    return str(results.get("checkpoint") or results.get("submission") or "")


def _fmt(v: Any) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def markdown_table(results: dict[str, Any]) -> str:
    """The table as GitHub Markdown."""
    head = ["tier", "mouse", *(n.replace("_", " ") for n in TABLE_METRICS)]
    lines = [
        f"Evaluation of `{_subject(results)}` on `{results['data_root']}`",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---", "---", *["---:"] * len(TABLE_METRICS)]) + "|",
    ]
    for tier, mouse, vals in _rows(results):
        cells = [tier, f"**{mouse}**" if mouse == "pooled" else mouse, *(_fmt(vals.get(n)) for n in TABLE_METRICS)]
        lines.append("| " + " | ".join(cells) + " |")
    if len(results.get("checkpoints", [])) > 1:
        lines += ["", "Ensemble members: " + ", ".join(f"`{c}`" for c in results["checkpoints"])]
    if results.get("max_trials"):
        lines += ["", f"Estimate on at most {results['max_trials']} trials per mouse and tier."]
    return "\n".join(lines) + "\n"


def write_markdown(results: dict[str, Any], path: str | Path) -> None:
    """Write the Markdown table atomically."""
    write_text_atomic(path, markdown_table(results))


def print_table(results: dict[str, Any]) -> None:
    """A rich table: one row per tier (pooled), per mouse, and per stimulus type."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=_subject(results))
    table.add_column("tier")
    table.add_column("mouse")
    for name in TABLE_METRICS:
        table.add_column(name.replace("_", " "), justify="right")
    for tier, mouse, vals in _rows(results):
        table.add_row(
            tier, "[b]pooled[/b]" if mouse == "pooled" else mouse, *(_fmt(vals.get(n)) for n in TABLE_METRICS)
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # logs and pipes: do not squeeze mouse ids into 80 columns
    console.print(table)


def write_tensorboard(results: dict[str, Any], log_dir: str | Path) -> None:
    """Text (the Markdown table), pooled scalars, and figures into a TensorBoard run at ``log_dir``."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    try:
        writer.add_text("evaluate/table", markdown_table(results))
        for tier, res in results["tiers"].items():
            for name, value in res["pooled"].items():
                if isinstance(value, float) and math.isfinite(value):
                    writer.add_scalar(f"evaluate/{tier}/{name}", value)
            for stim, sub in res.get("per_stimulus_type", {}).items():
                value = sub["pooled"].get("single_trial_corr")
                if isinstance(value, float) and math.isfinite(value):
                    writer.add_scalar(f"evaluate/{tier}/{stim}/single_trial_corr", value)
        writer.add_figure("evaluate/stimulus_types", figures.stimulus_type_bars(results["tiers"]))
        for tier, vectors in results.get("_vectors", {}).items():
            if vectors and all("oracle_corr" in v for v in vectors.values()):
                writer.add_figure(f"evaluate/{tier}/correlation_vs_oracle", figures.oracle_scatter(vectors, tier))
    finally:
        writer.close()
