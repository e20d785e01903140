"""What every ``bench_<model>_forward.py`` shares: the alternating step timer (:func:`time_steps`) and the
throughput report (machine, command, a Markdown table of median seconds per step and samples/s, and each of our
variants' speed relative to the original)."""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn


def machine_line(script: str, argv: Sequence[str] | None, *notes: str) -> str:
    """``Machine: <arch>[, GPU], <threads>, torch <version>[, notes]. Command: `python benchmarks/<script> ...`.``"""
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    machine = ", ".join(
        [f"{platform.machine()}{gpu}", f"{torch.get_num_threads()} torch threads", f"torch {torch.__version__}", *notes]
    )
    command = f"python benchmarks/{script} " + " ".join(sys.argv[1:] if argv is None else argv)
    return f"Machine: {machine}. Command: `{command}`."


def report(script: str, argv: Sequence[str] | None, batch: int, times: Mapping[str, Sequence[float]]) -> None:
    """Print the report for ``times`` (model name → seconds per step; one entry must be ``original``)."""
    print(f"\n{machine_line(script, argv)}\n")
    print("| model | s / step (median) | samples/s |")
    print("|---|---|---|")
    medians = {name: float(np.median(t)) for name, t in times.items()}
    for name, median in medians.items():
        print(f"| {name} | {median:.3f} | {batch / median:.2f} |")
    for name, median in medians.items():
        if name != "original":
            print(f"\n{name} / original speed: {medians['original'] / median:.2f}×")


def time_steps(
    runs: Mapping[str, tuple[Callable[[], Tensor], Sequence[nn.Parameter]]],
    iters: int,
    step: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per training step of each run, the runs alternating step by step (fair under a shared machine's
    drifting load): ``runs`` maps a name to ``(loss, parameters)``; a step clears the gradients and times
    ``loss().backward()`` and then ``step()`` if given (an optimizer step; synchronising a GPU on both ends). The
    first round warms up and is not kept."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(iters + 1):
        for name, (loss, params) in runs.items():
            for p in params:
                p.grad = None
            _synchronize()
            start = time.perf_counter()
            loss().backward()
            if step is not None:
                step()
            _synchronize()
            seconds = time.perf_counter() - start
            if i > 0:
                times[name].append(seconds)
            print(f"  {'warm-up' if i == 0 else f'iter {i}'} {name}: {seconds:.3f} s", flush=True)
    return times


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
