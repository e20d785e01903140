"""Matplotlib figures a neuroscientist wants to see in TensorBoard (drawn off-screen with the Agg backend).

Mouse ids are long (``dynamic29156-11-10-Video-8744edeac3b4d1ce16b680916b5267ce``: 58 characters), so figures label
mice with :func:`mouse_label`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

#: Panels per row of :func:`readout_positions`.
PANELS_PER_ROW = 5


def mouse_label(mouse_id: str, width: int = 20) -> str:
    """A short label for ``mouse_id``: the part before ``-Video`` (the releases' ids read
    ``<animal>-<session>-<scan>-Video-<hash>``), elided in the middle to at most ``width`` characters."""
    name = mouse_id.split("-Video")[0] or mouse_id
    if len(name) <= width:
        return name
    head = (width - 1) // 2
    return f"{name[:head]}…{name[len(name) - (width - 1 - head) :]}"


def traces(
    pred: torch.Tensor, target: torch.Tensor, corr: np.ndarray, skip_frames: int, n: int = 4, mouse_id: str = ""
) -> Figure:
    """Recorded vs predicted traces ``(N, T)`` of the ``n`` best-predicted neurons of one trial."""
    order = np.argsort(-np.nan_to_num(corr))[:n]
    fig, axes = plt.subplots(
        len(order), 1, figsize=(8, 1.6 * len(order)), sharex=True, squeeze=False, layout="constrained"
    )
    t = np.arange(pred.shape[-1])
    for ax, i in zip(axes[:, 0], order, strict=True):
        ax.plot(t, target[i].numpy(), color="0.4", lw=0.8, label="recorded")
        ax.plot(t, pred[i].numpy(), color="tab:red", lw=1.0, label="predicted")
        ax.axvspan(0, skip_frames, color="0.9", lw=0)
        ax.set_ylabel(f"n{i}\nr={corr[i]:.2f}", fontsize=8)
    axes[0, 0].legend(loc="upper right", fontsize=7, frameon=False)
    if mouse_id:
        axes[0, 0].set_title(mouse_label(mouse_id), fontsize=8)
    axes[-1, 0].set_xlabel("frame (30 Hz); grey: unscored")
    return fig


def correlation_histogram(per_neuron: Mapping[str, np.ndarray]) -> Figure:
    """Histogram of per-neuron single-trial correlations, one line per mouse (legend beside the axes)."""
    fig, ax = plt.subplots(figsize=(6.5, 3.2), layout="constrained")
    bins = np.linspace(-0.2, 1.0, 49).tolist()
    for mouse, corr in per_neuron.items():
        ax.hist(np.asarray(corr), bins=bins, histtype="step", label=f"{mouse_label(mouse)} ({np.mean(corr):.3f})")
    ax.set_xlabel("single-trial correlation")
    ax.set_ylabel("neurons")
    fig.legend(loc="outside right upper", fontsize=6, frameon=False, title="mouse (mean r)", title_fontsize=6)
    return fig


def readout_positions(positions: Mapping[str, np.ndarray]) -> Figure:
    """Readout receptive-field positions ``(N, 2)`` in the normalised visual field [-1, 1]², one panel per mouse."""
    cols = min(len(positions), PANELS_PER_ROW)
    rows = -(-len(positions) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.2 * rows), squeeze=False, layout="constrained")
    for ax, (mouse, xy) in zip(axes.flat, positions.items(), strict=False):
        ax.scatter(xy[:, 0], xy[:, 1], s=2, alpha=0.5)
        ax.set_xlim(-1, 1)
        ax.set_ylim(1, -1)  # image rows grow downwards
        ax.set_title(mouse_label(mouse), fontsize=7)
        ax.set_aspect(36 / 64)
    for ax in axes.flat[len(positions) :]:
        ax.set_visible(False)
    return fig


def stimulus_type_bars(tiers: Mapping[str, Mapping[str, Any]]) -> Figure:
    """Pooled single-trial and oracle correlation per tier and per stimulus type (``evaluate``'s ``tiers`` results)."""
    labels, single, oracle = [], [], []
    for tier, res in tiers.items():
        entries = [(tier, res["pooled"])]
        entries += [(f"{tier}\n{stim}", sub["pooled"]) for stim, sub in res.get("per_stimulus_type", {}).items()]
        for label, pooled in entries:
            labels.append(label)
            single.append(pooled.get("single_trial_corr", math.nan))
            oracle.append(pooled.get("oracle_corr", math.nan))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(labels)), 3.4), layout="constrained")
    x = np.arange(len(labels))
    ax.bar(x - 0.2, single, width=0.4, label="single-trial corr", color="tab:blue")
    ax.bar(x + 0.2, oracle, width=0.4, label="oracle corr (ceiling)", color="0.7")
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("correlation (pooled over neurons)")
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def oracle_scatter(vectors: Mapping[str, Mapping[str, np.ndarray]], tier: str) -> Figure:
    """Per-neuron single-trial correlation vs leave-one-out oracle correlation, one colour per mouse (legend beside
    the axes, mice labelled by :func:`mouse_label`)."""
    fig, ax = plt.subplots(figsize=(6.0, 4.0), layout="constrained")
    for mouse, v in vectors.items():
        ax.scatter(v["oracle_corr"], v["single_trial_corr"], s=3, alpha=0.5, label=mouse_label(mouse))
    lo = min(0.0, *(float(np.min(v["single_trial_corr"])) for v in vectors.values()))
    ax.plot([lo, 1], [lo, 1], color="0.5", lw=0.8, ls="--")
    ax.set_xlabel("oracle correlation")
    ax.set_ylabel("single-trial correlation")
    ax.set_title(tier, fontsize=8)
    ax.legend(fontsize=6, frameon=False, markerscale=3, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig
