"""Training-step time in float32 vs bf16 autocast (``trainer.precision: bf16-mixed``), side by side.

Builds an experiment's CPU-sized demo model and data exactly as ``python -m lightning_sensorium.demo`` does (the
experiment and its CPU recipe ``experiments/cpu/<model>.yaml``), caches ``--batches`` training batches, then times
whole optimizer steps (forward, loss, backward, optimizer step) in float32, under
``torch.autocast(dtype=torch.bfloat16)``, and under autocast with the readout in float32 (``model.float32_readout``),
alternating step by step (fair under a shared machine's drifting load). On a CPU with native bf16 (AMX, AVX512-BF16)
the convolutions run in bf16; elsewhere autocast emulates it and is slower. Reports whether this machine computes bf16
natively (:func:`lightning_sensorium.demo.native_bf16`).

    python benchmarks/bench_precision.py [--config experiments/factorized.yaml] [--batches 12] [--iters 24] \
        [-- <options applied after the CPU recipe, e.g. --model.core.init_args.hidden_channels "[16, 16, 16]">]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from _report import machine_line, time_steps
from torch import Tensor

from lightning_sensorium.demo import native_bf16, recipe_args
from lightning_sensorium.launch import run_lightning, with_experiment_defaults


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--config", default="experiments/factorized.yaml", help="experiment YAML")
    parser.add_argument("--data", default="data/stores", help="stores (the demo's by default)")
    parser.add_argument("--batches", type=int, default=12, help="training batches cached and cycled")
    parser.add_argument("--iters", type=int, default=24, help="timed steps per precision")
    parser.add_argument("overrides", nargs="*", help="after --: options applied after the CPU recipe")
    ns = parser.parse_args(argv)
    args = [*recipe_args(ns.config), "--data.root", ns.data, *ns.overrides]
    cli = run_lightning(with_experiment_defaults(args), run=False)
    module, dm = cli.model, cli.datamodule
    dm.setup("fit")
    optimizers = module.configure_optimizers()
    optimizer = optimizers["optimizer"] if isinstance(optimizers, dict) else optimizers
    loader = iter(dm.train_dataloader())
    batches = [next(loader) for _ in range(ns.batches)]
    device = next(module.parameters()).device.type
    encoder = module.encoder

    def loss(dtype: torch.dtype | None, float32_readout: bool, cycle: Iterator[dict[str, Any]]) -> Callable[[], Tensor]:
        """The training loss of the next cached batch, under autocast to ``dtype`` (None: float32)."""

        def run() -> Tensor:
            encoder.float32_readout = float32_readout
            context = torch.autocast(device, dtype=dtype) if dtype is not None else contextlib.nullcontext()
            with context:
                return module.training_step(next(cycle), 0)

        return run

    def step() -> None:
        optimizer.step()
        optimizer.zero_grad()

    # name → (autocast dtype or None, Encoder.float32_readout); every variant cycles through the same batches
    variants = {
        "float32": (None, False),
        "bf16 autocast": (torch.bfloat16, False),
        "bf16 autocast, float32 readout": (torch.bfloat16, True),
    }
    params = list(module.parameters())
    runs = {name: (loss(*v, itertools.cycle(batches)), params) for name, v in variants.items()}
    times = time_steps(runs, ns.iters, step)
    medians = {name: float(np.median(t)) for name, t in times.items()}
    print(f"\n{machine_line('bench_precision.py', argv, f'native bf16: {native_bf16()}')}\n")
    print(f"| {ns.config} demo model, batch {batches[0]['video'].shape[0]} | s / step (median) | speed-up |")
    print("|---|---|---|")
    for name, median in medians.items():
        print(f"| {name} | {median:.3f} | {medians['float32'] / median:.2f}× |")
    return medians


if __name__ == "__main__":
    main()
