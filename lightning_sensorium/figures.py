"""Matplotlib figures a neuroscientist wants to see in TensorBoard (drawn off-screen with the Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def traces(pred: torch.Tensor, target: torch.Tensor, corr: np.ndarray, skip_frames: int, n: int = 4) -> Figure:
    """Recorded vs predicted traces ``(N, T)`` of the ``n`` best-predicted neurons of one trial."""
    order = np.argsort(-np.nan_to_num(corr))[:n]
    fig, axes = plt.subplots(len(order), 1, figsize=(8, 1.6 * len(order)), sharex=True, squeeze=False)
    t = np.arange(pred.shape[-1])
    for ax, i in zip(axes[:, 0], order, strict=True):
        ax.plot(t, target[i].numpy(), color="0.4", lw=0.8, label="recorded")
        ax.plot(t, pred[i].numpy(), color="tab:red", lw=1.0, label="predicted")
        ax.axvspan(0, skip_frames, color="0.9", lw=0)
        ax.set_ylabel(f"n{i}\nr={corr[i]:.2f}", fontsize=8)
    axes[0, 0].legend(loc="upper right", fontsize=7, frameon=False)
    axes[-1, 0].set_xlabel("frame (30 Hz); grey: unscored")
    fig.tight_layout()
    return fig


def correlation_histogram(per_neuron: Mapping[str, np.ndarray]) -> Figure:
    """Histogram of per-neuron single-trial correlations, one line per mouse."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    bins = np.linspace(-0.2, 1.0, 49).tolist()
    for mouse, corr in per_neuron.items():
        ax.hist(np.asarray(corr), bins=bins, histtype="step", label=f"{mouse} ({np.mean(corr):.3f})")
    ax.set_xlabel("single-trial correlation")
    ax.set_ylabel("neurons")
    ax.legend(fontsize=6, frameon=False)
    fig.tight_layout()
    return fig


def readout_positions(positions: Mapping[str, np.ndarray]) -> Figure:
    """Readout receptive-field positions ``(N, 2)`` in the normalised visual field [-1, 1]², per mouse."""
    fig, axes = plt.subplots(1, len(positions), figsize=(3.2 * len(positions), 2.2), squeeze=False)
    for ax, (mouse, xy) in zip(axes[0], positions.items(), strict=True):
        ax.scatter(xy[:, 0], xy[:, 1], s=2, alpha=0.5)
        ax.set_xlim(-1, 1)
        ax.set_ylim(1, -1)  # image rows grow downwards
        ax.set_title(mouse, fontsize=7)
        ax.set_aspect(36 / 64)
    fig.tight_layout()
    return fig
