"""Training-step time in float32 vs bf16 autocast (``trainer.precision: bf16-mixed``), side by side.

Builds an experiment's CPU-sized demo model and data exactly as ``python -m lightning_sensorium.demo`` does
(``demo.DEMO_OVERRIDES``), caches ``--batches`` training batches, then times whole optimizer steps (forward, loss,
backward, optimizer step) in float32, under ``torch.autocast(dtype=torch.bfloat16)``, and under autocast with the
readout in float32 (``model.float32_readout``), alternating step by step (fair under a shared machine's drifting
load). On a CPU with native bf16 (AMX, AVX512-BF16) the convolutions run
in bf16; elsewhere autocast emulates it and is slower. Reports whether this machine computes bf16 natively
(:func:`lightning_sensorium.demo.native_bf16`).

    python benchmarks/bench_precision.py [--config experiments/factorized.yaml] [--batches 12] [--iters 24] \
        [-- <options that replace the demo overrides, e.g. --model.core.init_args.hidden_channels "[16, 16, 16]">]
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time

import numpy as np
import torch

from lightning_sensorium.cli import lightning_main, with_defaults
from lightning_sensorium.demo import demo_overrides, native_bf16


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--config", default="experiments/factorized.yaml", help="experiment YAML")
    parser.add_argument("--data", default="data/stores", help="stores (the demo's by default)")
    parser.add_argument("--batches", type=int, default=12, help="training batches cached and cycled")
    parser.add_argument("--iters", type=int, default=24, help="timed steps per precision")
    parser.add_argument("overrides", nargs="*", help="after --: options that replace the demo overrides")
    ns = parser.parse_args(argv)
    args = ["--config", ns.config, "--data.root", ns.data, *demo_overrides(ns.config), *ns.overrides]
    cli = lightning_main(with_defaults(args), run=False)
    module, dm = cli.model, cli.datamodule
    dm.setup("fit")
    optimizers = module.configure_optimizers()
    optimizer = optimizers["optimizer"] if isinstance(optimizers, dict) else optimizers
    loader = iter(dm.train_dataloader())
    batches = [next(loader) for _ in range(ns.batches)]
    device = next(module.parameters()).device.type
    encoder = module.encoder
    # name → (autocast dtype or None, Encoder.float32_readout)
    variants = {
        "float32": (None, False),
        "bf16 autocast": (torch.bfloat16, False),
        "bf16 autocast, float32 readout": (torch.bfloat16, True),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(ns.iters + 1):  # the first round warms up and is not kept
        batch = batches[i % len(batches)]
        for name, (dtype, float32_readout) in variants.items():
            encoder.float32_readout = float32_readout
            context = torch.autocast(device, dtype=dtype) if dtype is not None else contextlib.nullcontext()
            start = time.perf_counter()
            with context:
                loss = module.training_step(batch, i)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if i > 0:
                times[name].append(time.perf_counter() - start)
    medians = {name: float(np.median(t)) for name, t in times.items()}
    command = "python benchmarks/bench_precision.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(
        f"\nMachine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"native bf16: {native_bf16()}. Command: `{command}`.\n"
    )
    print(f"| {ns.config} demo model, batch {batches[0]['video'].shape[0]} | s / step (median) | speed-up |")
    print("|---|---|---|")
    for name, median in medians.items():
        print(f"| {name} | {median:.3f} | {medians['float32'] / median:.2f}× |")
    return medians


if __name__ == "__main__":
    main()
