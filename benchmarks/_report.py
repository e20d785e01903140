"""The one throughput report every ``bench_<model>_forward.py`` prints: machine, command, a Markdown table of
median seconds per step and samples/s, and each of our variants' speed relative to the original."""

from __future__ import annotations

import platform
import sys
from collections.abc import Mapping, Sequence

import numpy as np
import torch


def report(script: str, argv: Sequence[str] | None, batch: int, times: Mapping[str, Sequence[float]]) -> None:
    """Print the report for ``times`` (model name → seconds per step; one entry must be ``original``)."""
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    machine = f"{platform.machine()}{gpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    command = f"python benchmarks/{script} " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"\nMachine: {machine}. Command: `{command}`.\n")
    print("| model | s / step (median) | samples/s |")
    print("|---|---|---|")
    medians = {name: float(np.median(t)) for name, t in times.items()}
    for name, median in medians.items():
        print(f"| {name} | {median:.3f} | {batch / median:.2f} |")
    for name, median in medians.items():
        if name != "original":
            print(f"\n{name} / original speed: {medians['original'] / median:.2f}×")
