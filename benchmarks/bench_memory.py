"""Training memory of every recipe: ``MemoryCheck``'s estimate (allocation-free) against a real measurement.

1. Checked: for each experiment at a small size (its CPU recipe, a short window, batch 1–2), the estimate of the
   saved activations and gradients next to the real growth of the process's peak resident memory over one forward
   and backward pass on the CPU (each model in a fresh process, so peaks do not mix).
2. Full size: the estimate of every recipe at its own batch size and window, in float32 and under bf16 autocast,
   as the pre-flight check computes it (weights + gradients + optimiser state + EMA copies + saved activations).

    python benchmarks/bench_memory.py [--data data/stores]     # the demo's stores (make demo)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

from _report import machine_line

ROOT = Path(__file__).resolve().parents[1]
#: experiment → (batch size, frames) of the small real measurement.
SMALL = {
    "factorized": (2, 80),
    "gru": (2, 40),
    "dwiseneuro": (2, 16),
    "dynamic_v1fm": (2, 30),
    "viv1t": (1, 40),
}


def measure(config: str, data: str, batch_size: int, frames: int) -> dict[str, float]:
    """In this process: the estimate and the real peak-RSS growth of one forward + backward (GiB)."""
    import torch

    from lightning_sensorium.callbacks.memory import GIB, estimate_training_memory
    from lightning_sensorium.launch import run_lightning, with_experiment_defaults

    args = ["--config", f"experiments/{config}.yaml", "--data.root", data]
    args += ["--data.batch_size", str(batch_size), "--data.frames", str(frames), "--data.batch_mode", "per_mouse"]
    cli = run_lightning(with_experiment_defaults(args), run=False)
    dm = cli.datamodule
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    encoder = cli.model.encoder.train()
    estimate = estimate_training_memory(encoder, batch, optimizer_states=0)

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()

    base = rss()
    out = encoder(batch["video"], batch["mouse_id"], behavior=batch["behavior"], pupil_center=batch["pupil_center"])
    out.float().sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert torch.isfinite(out).all()
    return {
        "estimate_gib": (estimate.activations + estimate.gradients) / GIB,
        "measured_gib": max(peak - base, 0) / GIB,
    }


def full_size(data: str) -> list[dict[str, object]]:
    """The pre-flight estimate of every recipe at its own size (float32 and bf16 autocast)."""
    from lightning_sensorium.callbacks.memory import GIB, estimate_training_memory
    from lightning_sensorium.launch import run_lightning, with_experiment_defaults

    rows = []
    for config in SMALL:
        args = ["--config", f"experiments/{config}.yaml", "--data.root", data]
        cli = run_lightning(with_experiment_defaults(args), run=False)
        dm, encoder = cli.datamodule, cli.model.encoder
        batch = dm.example_batch()
        copies = 1 + sum(type(cb).__name__ == "EMA" for cb in cli.trainer.callbacks)
        row: dict[str, object] = {"model": config, "batch": dm.batch_size, "frames": dm.frames}
        for name, low in (("float32", False), ("bf16", True)):
            est = estimate_training_memory(encoder, batch, optimizer_states=2, weight_copies=copies, low_precision=low)
            row[name] = est.total / GIB
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--data", default="data/stores", help="stores (the demo's by default)")
    parser.add_argument("--one", nargs=3, metavar=("CONFIG", "B", "T"), help=argparse.SUPPRESS)  # child process
    ns = parser.parse_args(argv)
    if ns.one:
        print(json.dumps(measure(ns.one[0], ns.data, int(ns.one[1]), int(ns.one[2]))))
        return
    print(machine_line("bench_memory.py", argv))
    print("\n| model | batch × frames | estimate: activations + gradients | measured: peak RSS growth | ratio |")
    print("|---|---|---|---|---|")
    for config, (b, t) in SMALL.items():
        cmd = [sys.executable, __file__, "--data", ns.data, "--one", config, str(b), str(t)]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        ratio = r["estimate_gib"] / r["measured_gib"] if r["measured_gib"] else float("nan")
        print(f"| {config} | {b} × {t} | {r['estimate_gib']:.2f} GiB | {r['measured_gib']:.2f} GiB | {ratio:.2f} |")
    print("\n| model | batch × frames | float32 | bf16 autocast |")
    print("|---|---|---|---|")
    for row in full_size(ns.data):
        size = f"{row['batch']} × {row['frames']}"
        print(f"| {row['model']} | {size} | {row['float32']:.1f} GiB | {row['bf16']:.1f} GiB |")


if __name__ == "__main__":
    main()
