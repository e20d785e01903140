"""Training-batch loading time of an experiment's demo datamodule: milliseconds per batch, in the main process.

Builds the datamodule exactly as ``python -m lightning_sensorium.demo`` does (the experiment and its CPU recipe
``experiments/cpu/<model>.yaml``: the demo's windows, frame step, normalisation and response scale), then draws
``--batches`` training batches (``num_workers: 0``, as the demo trains) after ``--warmup`` untimed ones, ``--repeats``
times, and reports the median time per batch and per sample. The demo's step is ~0.13–0.23 s, so every 10 ms here is
4–8 % of its steps.

Run it from another checkout's root (``cd <checkout> && python /path/to/bench_loader.py``) to time that code's
loader side by side with this one's: the script imports ``lightning_sensorium`` from the working directory.

    python benchmarks/bench_loader.py [--config experiments/factorized.yaml] [--data data/stores] [--batches 64] \\
        [--repeats 3] [-- <options applied after the CPU recipe>]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from _report import machine_line


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--config", default="experiments/factorized.yaml", help="experiment YAML")
    parser.add_argument("--data", default="data/stores", help="stores (the demo's by default)")
    parser.add_argument("--batches", type=int, default=64, help="timed batches per repeat")
    parser.add_argument("--warmup", type=int, default=8, help="untimed batches first (page cache, allocator)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes; the median is reported")
    parser.add_argument("overrides", nargs="*", help="after --: options applied after the CPU recipe")
    ns = parser.parse_args(argv)
    sys.path.insert(0, str(Path.cwd()))  # the checkout we stand in (see the docstring)
    from lightning_sensorium.demo import recipe_args
    from lightning_sensorium.launch import run_lightning, with_experiment_defaults

    args = [*recipe_args(ns.config), "--data.root", ns.data, *ns.overrides]
    args += ["--data.samples_per_epoch", "1000000"]  # one epoch holds every timed batch
    cli = run_lightning(with_experiment_defaults(args), run=False)
    dm = cli.datamodule
    dm.setup("fit")
    per_batch, batch_size = [], 0
    for _ in range(ns.repeats):
        loader = iter(dm.train_dataloader())
        for _ in range(ns.warmup):
            next(loader)
        start = time.perf_counter()
        for _ in range(ns.batches):
            batch = next(loader)
        per_batch.append((time.perf_counter() - start) / ns.batches)
        batch_size = int(batch["video"].shape[0])
    median = float(np.median(per_batch))
    import lightning_sensorium

    print(f"\n{machine_line('bench_loader.py', argv, f'code: {Path(lightning_sensorium.__file__).parent}')}\n")
    print(f"| {ns.config} demo training batches ({batch_size} windows) | ms / batch (median) | ms / window |")
    print("|---|---|---|")
    print(f"| {ns.batches} batches × {ns.repeats} | {1e3 * median:.1f} | {1e3 * median / batch_size:.2f} |")
    return {"s_per_batch": median}


if __name__ == "__main__":
    main()
