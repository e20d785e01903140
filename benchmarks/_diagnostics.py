"""Shared by the ground-truth diagnostics (``ground_truth_ablation.py``, ``diagnose_checkpoint.py``,
``learning_curve.py``)."""

from __future__ import annotations

import numpy as np


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over neurons of the correlation over time of ``a`` and ``b`` ``(N, T)``; constant neurons count 0."""
    a, b = a - a.mean(-1, keepdims=True), b - b.mean(-1, keepdims=True)
    return float(((a * b).sum(-1) / (np.sqrt((a * a).sum(-1) * (b * b).sum(-1)) + 1e-8)).mean())
