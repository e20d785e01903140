"""Training memory of every recipe: ``MemoryCheck``'s estimate (allocation-free) against a real measurement.

1. Checked: for each experiment at a small size (its CPU recipe, a short window, batch 1–2), the estimate of the
   saved activations and gradients and the traced peak of the step (3. below) next to the real growth of the
   process's peak resident memory over one training step's forward and backward on the CPU (each model in a fresh
   process, so peaks do not mix).
2. Full size: the estimate of every recipe at its own batch size and window, in float32 and under bf16 autocast,
   as the pre-flight check computes it (weights + gradients + optimiser state + EMA copies + saved activations).
3. ``--traced``: the peak of whole training steps traced without allocating (:func:`traced_peak`: FakeTensorMode and
   torch's ``MemTracker``, backward temporaries included) at full size per recipe, with the largest batch per GPU
   memory (24/40/80/141 GiB), with gradient checkpointing where the original offers it. Full size wants stores
   with the competition's 8,000 neurons (``lightning-sensorium synth --neurons 8000``).

    python benchmarks/bench_memory.py [--data data/stores]     # the demo's stores (make demo)
    python benchmarks/bench_memory.py --traced --data /tmp/stores8000
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import resource
import subprocess
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
#: GPU memory sizes (GiB) of the largest-batch columns, and the share of it a step may use (the rest: the CUDA
#: context, cuDNN workspaces, the allocator's fragmentation, evaluation batches).
GPUS = (24, 40, 80, 141)
USABLE = 0.85
#: The core option that recomputes activations in the backward pass, in the experiments whose original offers it
#: (ViV1T's ``--grad_checkpointing``, Dynamic-V1FM's ``grad_checkpointing``).
CHECKPOINTING = {"viv1t": "gradient_checkpointing", "dynamic_v1fm": "grad_checkpointing"}


def training_batch(dm: Any, batch_size: int | None = None) -> dict[str, Any]:
    """``dm.example_batch()``'s shapes at ``batch_size`` on the CPU with empty responses ``(B, N, T)`` (a list of
    each sample's ``(N_mouse, T)`` for mixed batches): what a training step reads, allocated but never written."""
    import torch

    b = batch_size or dm.batch_size
    batch = {
        k: (v[:1].expand(b, *v.shape[1:]) if isinstance(v, torch.Tensor) else v) for k, v in dm.example_batch().items()
    }
    batch = {k: (torch.empty(v.shape) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    mice = batch["mouse_id"]
    if isinstance(mice, list):
        mice = [dm.mouse_ids[i % len(dm.mouse_ids)] for i in range(b)]
        batch["mouse_id"] = mice
        batch["responses"] = [torch.empty(dm.stores[m].num_neurons, dm.frames) for m in mice]  # B × (N_mouse, T)
    else:
        batch["responses"] = torch.empty(b, dm.stores[mice].num_neurons, dm.frames)  # (B, N, T)
    return batch


def traced_peak(module: Any, batch: Mapping[str, Any], low_precision: bool = False, steps: int = 2) -> dict[str, int]:
    """Peak bytes of ``steps`` forward + backward passes of ``module.training_step`` on ``batch`` (gradients kept
    between steps, as under gradient accumulation), traced without allocating: the encoder and loss are copied as
    fake tensors (FakeTensorMode) and torch's ``MemTracker`` follows every tensor's storage, so temporaries of the
    backward pass count, as does the batch. ``low_precision``: under CPU bf16 autocast. Returns bytes per category
    (``PARAM``, ``GRAD``, ``ACT``, ``TEMP``, ...) and ``Total``; the optimiser's state is not included."""
    import torch
    from torch._subclasses.fake_tensor import FakeCopyMode, FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with FakeCopyMode(mode):
        encoder, loss_fn = copy.deepcopy(module.encoder), copy.deepcopy(module.loss_fn)
    with mode:
        fake = {k: _fake(mode, v) for k, v in batch.items()}
    real = module.encoder, module.loss_fn, module.log
    module.encoder, module.loss_fn, module.log = encoder, loss_fn, lambda *args, **kwargs: None
    tracker = _peak_tracker_class()()
    tracker.track_external(
        encoder, *[t for v in fake.values() for t in (v if isinstance(v, list) else [v]) if isinstance(t, torch.Tensor)]
    )
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if low_precision else contextlib.nullcontext()
    try:
        with warnings.catch_warnings(), mode, tracker, autocast:
            warnings.simplefilter("ignore")  # FakeTensorMode and MemTracker notes
            for _ in range(steps):
                module.training_step(fake, 0).backward()
    finally:
        module.encoder, module.loss_fn, module.log = real
    snapshot = next(iter(tracker.get_tracker_snapshot("peak").values()))
    return {str(k).split(".")[-1]: int(v) for k, v in snapshot.items()}


def _peak_tracker_class() -> type:
    from torch.distributed._tools.mem_tracker import MemTracker

    class PeakTracker(MemTracker):
        """``MemTracker`` without its per-module statistics, which refuse a module called twice in a step (the
        shared output activation of a mixed batch's mice); the peak over all tensors is what is kept."""

        def _pre_fw_hook(self, *args: Any) -> None:
            pass

        def _post_fw_hook(self, *args: Any) -> None:
            pass

        def _pre_bw_hook(self, *args: Any) -> None:
            pass

        def _post_bw_hook(self, *args: Any) -> None:
            pass

    return PeakTracker


def _fake(mode: Any, value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return mode.from_tensor(value)
    if isinstance(value, list):
        return [_fake(mode, v) for v in value]
    return value


def measure(config: str, data: str, batch_size: int, frames: int) -> dict[str, float]:
    """In this process: the estimate, the traced peak and the real peak-RSS growth of one training step's forward
    and backward (GiB)."""
    import torch

    from lightning_sensorium.callbacks.memory import GIB, estimate_training_memory
    from lightning_sensorium.launch import run_lightning, with_experiment_defaults

    args = ["--config", f"experiments/{config}.yaml", "--data.root", data]
    args += ["--data.batch_size", str(batch_size), "--data.frames", str(frames), "--data.batch_mode", "per_mouse"]
    cli = run_lightning(with_experiment_defaults(args), run=False)
    dm = cli.datamodule
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module = cli.model.train()
    encoder = module.encoder
    estimate = estimate_training_memory(encoder, batch, optimizer_states=0)
    traced = traced_peak(module, batch, steps=1)

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()

    module.log = lambda *args, **kwargs: None
    base = rss()
    loss = module.training_step(batch, 0)  # the step traced_peak follows: forward, loss, regularizer
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert torch.isfinite(loss)
    return {
        "estimate_gib": (estimate.activations + estimate.gradients) / GIB,
        "traced_gib": (traced["Total"] - traced["PARAM"] - traced["BUFFER"]) / GIB,
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


def full_size_traced(data: str) -> list[dict[str, Any]]:
    """Every recipe's traced peak (weights, gradients, activations, temporaries, AdamW's two states, EMA copies) at
    its own batch and window in float32 and bf16 autocast, and the largest bf16 batch per GPU memory in :data:`GPUS`
    (the peak is linear in the batch: traced at half the recipe's batch and at its batch); again with gradient
    checkpointing where the original offers it."""
    from lightning_sensorium.callbacks.memory import GIB, estimate_training_memory
    from lightning_sensorium.launch import run_lightning, with_experiment_defaults

    rows = []
    for config in SMALL:
        for checkpointing in (False, True) if config in CHECKPOINTING else (False,):
            args = ["--config", f"experiments/{config}.yaml", "--data.root", data]
            if checkpointing:
                args += [f"--model.core.init_args.{CHECKPOINTING[config]}", "true"]
            cli = run_lightning(with_experiment_defaults(args), run=False)
            dm, module = cli.datamodule, cli.model.train()
            dm.setup("fit")
            copies = 1 + sum(type(cb).__name__ == "EMA" for cb in cli.trainer.callbacks)
            fixed = estimate_training_memory(module.encoder, dm.example_batch(), optimizer_states=2)
            state = fixed.optimizer + (copies - 1) * fixed.weights  # what the traced steps do not hold
            b = dm.batch_size
            row: dict[str, Any] = {"model": config, "checkpointing": checkpointing, "batch": b, "frames": dm.frames}
            row["float32"] = (traced_peak(module, training_batch(dm))["Total"] + state) / GIB
            half = max(1, b // 2)
            at_half = traced_peak(module, training_batch(dm, half), low_precision=True)["Total"] + state
            at_full = traced_peak(module, training_batch(dm), low_precision=True)["Total"] + state
            per_sample = (at_full - at_half) / max(b - half, 1)
            row["bf16"] = at_full / GIB
            row["max_batch"] = [int((USABLE * gib * GIB - (at_full - b * per_sample)) // per_sample) for gib in GPUS]
            rows.append(row)
            print(f"  {config}{' (checkpointing)' if checkpointing else ''}: {row}", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--data", default="data/stores", help="stores (the demo's by default)")
    parser.add_argument("--one", nargs=3, metavar=("CONFIG", "B", "T"), help=argparse.SUPPRESS)  # child process
    parser.add_argument("--traced", action="store_true", help="the traced peak at full size, largest batch per GPU")
    parser.add_argument("--small-data", help="stores of the small measurement (default: --data)")
    ns = parser.parse_args(argv)
    if ns.one:
        print(json.dumps(measure(ns.one[0], ns.data, int(ns.one[1]), int(ns.one[2]))))
        return
    print(machine_line("bench_memory.py", argv))
    print(
        "\n| model | batch × frames | estimate: activations + gradients | traced peak − weights "
        "| measured: peak RSS growth | estimate / measured | traced / measured |"
    )
    print("|---|---|---|---|---|---|---|")
    for config, (b, t) in SMALL.items():
        cmd = [sys.executable, __file__, "--data", ns.small_data or ns.data, "--one", config, str(b), str(t)]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        m = r["measured_gib"] or float("nan")
        print(
            f"| {config} | {b} × {t} | {r['estimate_gib']:.2f} GiB | {r['traced_gib']:.2f} GiB | {m:.2f} GiB "
            f"| {r['estimate_gib'] / m:.2f} | {r['traced_gib'] / m:.2f} |"
        )
    if ns.traced:
        gpus = " | ".join(f"{g} GiB" for g in GPUS)
        print(f"\n| model | batch × frames | float32 | bf16 autocast | largest bf16 batch: {gpus} |")
        print("|---|---|---|---|" + "---|" * len(GPUS))
        for row in full_size_traced(ns.data):
            name = row["model"] + (" + checkpointing" if row["checkpointing"] else "")
            fits = " | ".join(str(max(n, 0)) for n in row["max_batch"])
            print(
                f"| {name} | {row['batch']} × {row['frames']} | {row['float32']:.1f} GiB | {row['bf16']:.1f} GiB "
                f"| {fits} |"
            )
    print("\n| model | batch × frames | float32 | bf16 autocast |")
    print("|---|---|---|---|")
    for row in full_size(ns.data):
        size = f"{row['batch']} × {row['frames']}"
        print(f"| {row['model']} | {size} | {row['float32']:.1f} GiB | {row['bf16']:.1f} GiB |")


if __name__ == "__main__":
    main()
