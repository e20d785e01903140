"""``torch.compile`` of every core: graph breaks, compilation time, and training steps eager vs compiled, side by side.

For each experiment at its CPU recipe's size (``experiments/cpu/<model>.yaml``, the demo's): the graph breaks of the
core's forward (``torch._dynamo.explain``), then whole training steps (forward, loss, backward, optimizer step) with
the eager core and with ``torch.compile(core)`` (the same parameters), alternating step by step; the first compiled
step, which compiles forward and backward, is reported apart. ``model.compile_core: true`` compiles the core the
same way in a fit.

    python benchmarks/bench_compile.py [--configs factorized gru ...] [--iters 6] [--data data/stores]
"""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Any

import numpy as np
import torch
import torch._dynamo as dynamo
from _report import machine_line, time_steps

from lightning_sensorium.demo import recipe_args
from lightning_sensorium.launch import run_lightning, with_experiment_defaults

MODELS = ["factorized", "gru", "dwiseneuro", "dynamic_v1fm", "viv1t"]


def measure(config: str, data: str, iters: int) -> dict[str, Any]:
    """Graph breaks, first compiled step and median step times of one experiment's CPU-sized core."""
    args = [*recipe_args(f"experiments/{config}.yaml"), "--data.root", data]
    cli = run_lightning(with_experiment_defaults(args), run=False)
    module, dm = cli.model, cli.datamodule
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    batches = [next(loader) for _ in range(3)]
    batch = batches[0]
    encoder, core = module.encoder, module.encoder.core
    explained = dynamo.explain(core)(batch["video"], batch["behavior"], batch["pupil_center"])
    dynamo.reset()
    compiled = torch.compile(core)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)  # the recipe's schedulers need a Trainer

    def loss(which: torch.nn.Module, cycle: Any) -> Any:
        def run() -> torch.Tensor:
            encoder.core = which
            return module.training_step(next(cycle), 0)

        return run

    def step() -> None:
        optimizer.step()
        optimizer.zero_grad()

    params = list(module.parameters())
    encoder.core = compiled
    start = time.perf_counter()
    module.training_step(batch, 0).backward()  # compiles forward and backward
    first = time.perf_counter() - start
    optimizer.zero_grad()
    runs = {"eager": (loss(core, itertools.cycle(batches)), params)}
    runs["compiled"] = (loss(compiled, itertools.cycle(batches)), params)
    times = time_steps(runs, iters, step)
    encoder.core = core
    eager, comp = (float(np.median(times[k])) for k in ("eager", "compiled"))
    reasons = sorted({str(b.reason).splitlines()[0][:70] for b in explained.break_reasons})
    return {
        "breaks": explained.graph_break_count,
        "reasons": reasons,
        "first": first,
        "eager": eager,
        "compiled": comp,
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=MODELS, help="experiments (names under experiments/)")
    parser.add_argument("--data", default="data/stores", help="stores (the demo's by default)")
    parser.add_argument("--iters", type=int, default=6, help="timed steps per variant")
    ns = parser.parse_args(argv)
    rows = {config: measure(config, ns.data, ns.iters) for config in ns.configs}
    print(f"\n{machine_line('bench_compile.py', argv)}\n")
    print(
        "| core (CPU recipe) | graph breaks | first compiled step (s) | eager s / step | compiled s / step | speed-up |"
    )
    print("|---|---|---|---|---|---|")
    for config, r in rows.items():
        why = f" ({'; '.join(r['reasons'])})" if r["reasons"] else ""
        speed = r["eager"] / r["compiled"]
        print(
            f"| {config} | {r['breaks']}{why} | {r['first']:.1f} | {r['eager']:.3f} | {r['compiled']:.3f} "
            f"| {speed:.2f}× |"
        )
    return rows


if __name__ == "__main__":
    main()
