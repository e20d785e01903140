"""Can the loader keep a GPU busy? Training windows/s the data module delivers next to what each model would consume.

For every recipe at full size (``experiments/<model>.yaml``: its frames, frame step, batch, normalisation; stores
with the competition's 8,000 neurons per mouse):

- delivered: windows/s of ``datamodule.train_dataloader()`` with 0, 1, 2, 4 worker processes (after warm-up
  batches, so the workers' start is not counted), and in this process with one torch thread (what a worker
  computes, without the transfer of its batches to the main process), and where the recipe draws CutMix partners
  from fresh windows (DwiseNeuro), the rate at which the main process reads them (``datamodule.training_window``);
- consumed: FLOPs of one window's training step, 3 × its forward (the encoder, the loss) counted by
  ``torch.utils.flop_counter.FlopCounterMode`` on the ``meta`` device (shapes only: matmuls, convolutions and
  attention; element-wise work, grid sampling and the optimiser step are not counted), turned into windows/s at a
  stated dense bf16 throughput and utilisation (H100 SXM: ~989 TFLOP/s dense bf16; 40 % by default). The backward
  is taken as 2 × the forward instead of counted: torch 2.13's counter prices a grouped convolution's backward as a
  dense one (DwiseNeuro's depthwise convolutions: ~300× too many FLOPs).

A 16-core GPU node is extrapolated from the 1-worker rate: one worker per core, two cores kept for the main process
and the trainer (14 workers), assuming the workers scale linearly (they share nothing but the page cache).

    lightning-sensorium synth /tmp/full --mice 2 --neurons 8000 --train-trials 24 --clips-per-tier 1 --repeats 2
    lightning-sensorium convert /tmp/full --out /tmp/full_stores
    python benchmarks/bench_feed.py --data /tmp/full_stores [--workers 0 1 2 4] [--batches 20]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _report import machine_line

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("factorized", "gru", "dwiseneuro", "dynamic_v1fm", "viv1t")
NODE_WORKERS = 14


def build(model: str, data: str, *overrides: str) -> Any:
    """The recipe's LightningCLI (model, data module, trainer), not run; one epoch holds every timed batch."""
    from lightning_sensorium.launch import run_lightning, with_experiment_defaults

    args = [
        "--config",
        str(ROOT / "experiments" / f"{model}.yaml"),
        "--data.root",
        data,
        "--data.samples_per_epoch",
        "100000",
    ]
    return run_lightning(with_experiment_defaults([*args, *overrides]), run=False)


def flops_per_window(cli: Any) -> float:
    """FLOPs of one window's training step: 3 × the forward's (loss included), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    dm, module = cli.datamodule, cli.model.train()
    example = dm.example_batch()  # (B, ...) on meta
    b = int(example["video"].shape[0])
    mice = example["mouse_id"]
    if isinstance(mice, list):
        responses: Any = [torch.empty(dm.stores[m].num_neurons, dm.frames, device="meta") for m in mice]
    else:
        responses = torch.empty(b, dm.stores[mice].num_neurons, dm.frames, device="meta")  # (B, N, T)
    module.to("meta")
    module.log = lambda *args, **kwargs: None
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module.training_step({**example, "responses": responses}, 0)
    return 3 * counter.get_total_flops() / b


def loader_rate(cli: Any, workers: int, batches: int, warmup: int, threads: int | None = None) -> float:
    """Training windows/s of the data module with ``workers`` worker processes (and ``threads`` torch threads in
    this process: 1 is what each worker process runs with)."""
    if threads is not None:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return loader_rate(cli, workers, batches, warmup)
        finally:
            torch.set_num_threads(before)
    dm = cli.datamodule
    dm.num_workers = workers
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    for _ in range(warmup):
        next(loader)
    windows = 0
    start = time.perf_counter()
    for _ in range(batches):
        windows += int(next(loader)["video"].shape[0])
    rate = windows / (time.perf_counter() - start)
    del loader  # stops the workers
    return rate


def partner_rate(cli: Any, windows: int) -> float | None:
    """Windows/s of fresh CutMix partners read in the main process, where the recipe uses them; else None."""
    if not any(type(cb).__name__ == "CutMix" and cb.partner == "fresh_window" for cb in cli.trainer.callbacks):
        return None
    dm = cli.datamodule
    rng = np.random.default_rng(0)
    dm.training_window(dm.mouse_ids[0], rng)  # warm
    start = time.perf_counter()
    for i in range(windows):
        dm.training_window(dm.mouse_ids[i % len(dm.mouse_ids)], rng)
    return windows / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--data", required=True, help="stores with 8,000 neurons per mouse (see the docstring)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2, 4])
    parser.add_argument("--batches", type=int, default=20, help="timed batches per setting")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first (workers start, page cache)")
    parser.add_argument("--tflops", type=float, default=989.0, help="dense bf16 TFLOP/s of the GPU (H100 SXM)")
    parser.add_argument("--utilisation", type=float, default=0.4, help="share of --tflops a training step reaches")
    ns = parser.parse_args(argv)
    print(machine_line("bench_feed.py", argv))
    head = " | ".join(f"workers: {w}" for w in ns.workers)
    print(
        f"\nConsumed at {ns.tflops:.0f} TFLOP/s × {ns.utilisation:.0%}; "
        f"node: {NODE_WORKERS} workers × the 1-worker rate."
    )
    print(
        f"\n| model | batch × frames (step) | GFLOP / window | consumed windows/s | in process, 1 thread "
        f"| {head} | node (extrapolated) "
        "| CutMix partners (main process) | fed? |"
    )
    print("|---|---|---|---|---|" + "---|" * len(ns.workers) + "---|---|---|")
    for model in ns.models:
        flops = flops_per_window(build(model, ns.data))
        cli = build(model, ns.data)
        dm = cli.datamodule
        consumed = ns.tflops * 1e12 * ns.utilisation / flops
        one_thread = loader_rate(cli, 0, ns.batches, ns.warmup, threads=1)
        rates = {w: loader_rate(cli, w, ns.batches, ns.warmup) for w in ns.workers}
        per_worker = rates.get(1, rates[min(ns.workers)])
        node = per_worker * NODE_WORKERS
        partners = partner_rate(cli, 4 * dm.batch_size)
        # CutMix mixes every other window with a fresh partner, read in the main process, serially with the step.
        extra = "–" if partners is None else f"{partners:.0f} windows/s (needs {consumed / 2:.0f})"
        fed = node >= consumed and (partners is None or partners >= consumed / 2)
        cells = " | ".join(f"{rates[w]:.0f}" for w in ns.workers)
        print(
            f"| {model} | {dm.batch_size} × {dm.frames} ({dm.frame_step}) | {flops / 1e9:.1f} | {consumed:.0f} "
            f"| {one_thread:.0f} | {cells} | {node:.0f} | {extra} | {'yes' if fed else 'no'} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
