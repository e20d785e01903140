"""The GPU acceptance run (``make gpu-check``): every model at full size under bf16 autocast, eager and compiled, on
synthetic stores it writes itself, then a 1-GPU ``ddp`` fit through the CLI; the figures as JSON. Nothing is read
from outside the checkout; about 8 minutes on one H100 or H200.

Per model (``experiments/<model>.yaml``: its batch, window, frame step; 8,000 neurons per mouse): ``--steps`` timed
training steps (forward, the recipe's loss and regularizer, backward, AdamW) after warm-up steps, on a few batches
of the training loader kept on the device, eager and with ``torch.compile`` of the core: samples/s, the first
compiled step's seconds, peak memory (``torch.cuda.max_memory_allocated``), and the attention kernel the SDPA calls
ran (flash / efficient / cudnn / math, from the ATen ops a profiled step recorded). Ours vs the original: where an
original's exported code lies under ``--originals`` (``data/originals/<name>``, ignored by git; the folders the
``benchmarks/bench_<model>_forward.py`` scripts take as ``--original``), that script runs and its speed ratio is
kept; absent ones are skipped. A ``--budget-s`` stops starting new phases once spent (what was skipped is recorded).

    make gpu-check                                         # = python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --dry-run               # the same code on the CPU at tiny size (tests)
    python benchmarks/gpu_check.py --models viv1t --steps 20 --out runs/gpu_check.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from _report import machine_line

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("factorized", "gru", "dwiseneuro", "dynamic_v1fm", "viv1t")
#: Synthetic mice of the run: full size (the competition's 8,000 neurons, few trials) and tiny (the tests' size).
FULL = {"mice": 2, "neurons": 8000, "train_trials": 8, "clips_per_tier": 1, "repeats": 2}
TINY = {"mice": 2, "neurons": 24, "train_trials": 12, "clips_per_tier": 2, "repeats": 3}
#: model → (script, folder under --originals) of the ours-vs-original comparison.
ORIGINALS = {
    "factorized": ("bench_factorized_forward.py", "np_orig"),
    "gru": ("bench_gru_forward.py", "np_orig"),
    "dwiseneuro": ("bench_dwiseneuro_forward.py", "dwiseneuro_orig"),
    "dynamic_v1fm": ("bench_swin3d_forward.py", "dynvfm_orig"),
    "viv1t": ("bench_vivit_forward.py", "viv1t_orig"),
}
#: ATen SDPA implementations → backend name (CUDA ops, and the CPU's flash kernel in the dry run).
SDPA_OPS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
}


def make_stores(root: Path, tiny: bool) -> Path:
    """Synthetic mice (:data:`FULL` or :data:`TINY`) converted to zarr stores under ``root``."""
    from lightning_sensorium.data.convert import convert
    from lightning_sensorium.data.synthetic import synthesize

    release, stores = root / "release", root / "stores"
    synthesize(release, progress=False, seed=0, **(TINY if tiny else FULL))
    convert([release], stores, progress=False)
    return stores


def config_args(model: str, tiny: bool) -> list[str]:
    """``--config`` of the experiment, and of its tiny test size with ``tiny``."""
    args = ["--config", str(ROOT / "experiments" / f"{model}.yaml")]
    return args + (["--config", str(ROOT / "tests" / "configs" / f"{model}.yaml")] if tiny else [])


def build(model: str, stores: Path, tiny: bool, log_dir: Path) -> Any:
    from lightning_sensorium.launch import run_lightning, with_experiment_defaults

    args = [*config_args(model, tiny), "--data.root", str(stores), "--data.samples_per_epoch", "10000"]
    args += ["--trainer.logger.init_args.save_dir", str(log_dir), "--trainer.default_root_dir", str(log_dir)]
    if tiny:
        args += ["--data.batch_size", "2"]
    return run_lightning(with_experiment_defaults(args), run=False)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [to_device(v, device) for v in batch]
    return batch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float:
    """Peak memory since the last reset: the CUDA allocator's, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_model(
    model: str, mode: str, stores: Path, device: torch.device, ns: argparse.Namespace, log_dir: Path
) -> dict[str, Any]:
    """Training steps of ``model`` (``mode``: eager, or compiled core) under bf16 autocast: samples/s, peak memory,
    and for eager the SDPA backend. A failure is recorded (the run goes on with the next phase)."""
    if time.monotonic() > ns.deadline:
        return {"skipped": "time budget spent"}
    cli = build(model, stores, ns.tiny, log_dir)  # seeded: every phase starts from the same weights
    dm, module = cli.datamodule, cli.model
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    batches = [to_device(next(loader), device) for _ in range(2)]
    module.to(device).train()
    module.log = lambda *args, **kwargs: None
    if mode == "compiled":
        module.encoder.core.compile()
    result: dict[str, Any] = {"batch": dm.batch_size, "frames": dm.frames, "frame_step": dm.frame_step}
    try:
        result.update(time_steps(module, batches, device, ns.steps, ns.warmup))
        if mode == "eager":
            result["sdpa"] = sdpa_backends(module, batches[0], device)
    except Exception as err:
        result["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
    print(f"  {model} {mode}: {result}", flush=True)
    del cli, module, batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _step(module: Any, batch: dict[str, Any], optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = module.training_step(dict(batch), 0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def time_steps(module: Any, batches: list[Any], device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    synchronize(device)
    start = time.perf_counter()
    _step(module, batches[0], optimizer, device)
    synchronize(device)
    first = time.perf_counter() - start
    for i in range(warmup):
        _step(module, batches[i % len(batches)], optimizer, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    samples = 0
    for i in range(steps):
        batch = batches[i % len(batches)]
        _step(module, batch, optimizer, device)
        samples += int(batch["video"].shape[0])
    synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "samples_per_s": samples / seconds,
        "s_per_step": seconds / steps,
        "first_step_s": first,
        "peak_gib": peak_gib(device),
    }


def sdpa_backends(module: Any, batch: dict[str, Any], device: torch.device) -> list[str]:
    """The SDPA implementations one profiled training step ran (empty: the model calls no SDPA)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    optimizer = torch.optim.SGD(module.parameters(), lr=0.0)
    with profile(activities=activities) as prof:
        _step(module, batch, optimizer, device)
        synchronize(device)
    names = {e.key for e in prof.key_averages()}
    return sorted({backend for op, backend in SDPA_OPS.items() if op in names})


def versus_original(model: str, device: torch.device, ns: argparse.Namespace) -> dict[str, Any]:
    """Run ``benchmarks/bench_<model>_forward.py`` against the exported original, if it is there."""
    script, folder = ORIGINALS[model]
    original = Path(ns.originals) / folder
    if not original.is_dir():
        return {"skipped": f"no exported original at {original}"}
    if time.monotonic() > ns.deadline:
        return {"skipped": "time budget spent"}
    path = ROOT / "benchmarks" / script
    help_text = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True).stdout
    if device.type != "cpu" and "--device" not in help_text:
        return {"skipped": f"{script} runs on the CPU only (no --device option)"}
    cmd = [sys.executable, str(path), "--original", str(original), "--iters", "3"]
    cmd += ["--device", device.type] if "--device" in help_text else []
    cmd += ["--bf16"] if "--bf16" in help_text and device.type == "cuda" else []
    cmd += ["--tiny"] if ns.tiny and "--tiny" in help_text else []
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=ns.original_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {ns.original_timeout} s", "command": " ".join(cmd[1:])}
    ratios = dict(re.findall(r"^(\S+) / original speed: ([\d.]+)×", done.stdout, flags=re.M))
    if done.returncode or not ratios:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:], "command": " ".join(cmd[1:])}
    return {"speed_vs_original": {k: float(v) for k, v in ratios.items()}, "command": " ".join(cmd[1:])}


def ddp_fit(stores: Path, device: torch.device, ns: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """A few steps of ``lightning-sensorium fit`` with ``strategy: ddp`` on one device (a subprocess)."""
    if time.monotonic() > ns.deadline:
        return {"skipped": "time budget spent"}
    cmd = [sys.executable, "-m", "lightning_sensorium", "fit", *config_args("factorized", ns.tiny)]
    cmd += ["--data.root", str(stores), "--trainer.strategy", "ddp", "--trainer.devices", "1"]
    cmd += ["--trainer.accelerator", "gpu" if device.type == "cuda" else "cpu"]
    cmd += ["--trainer.precision", "bf16-mixed", "--trainer.max_steps", "4", "--trainer.limit_val_batches", "1"]
    cmd += ["--trainer.num_sanity_val_steps", "0", "--trainer.logger.init_args.save_dir", str(log_dir)]
    cmd += ["--trainer.default_root_dir", str(log_dir), "--data.batch_size", "2" if ns.tiny else "8"]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=ns.ddp_timeout)
    result: dict[str, Any] = {"returncode": done.returncode, "seconds": time.perf_counter() - start}
    if done.returncode:
        result["error"] = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return result


@contextlib.contextmanager
def workdir(keep: str | None) -> Iterator[Path]:
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        yield Path(keep)
        return
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        yield Path(tmp)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny models and mice")
    parser.add_argument("--dry-run", action="store_true", help="= --device cpu --tiny --steps 2 --warmup 1")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model and mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="eager only")
    parser.add_argument("--no-ddp", dest="ddp", action="store_false", help="skip the ddp fit")
    parser.add_argument("--originals", default=str(ROOT / "data" / "originals"), help="exported originals")
    parser.add_argument("--original-timeout", type=int, default=120, help="seconds per original comparison")
    parser.add_argument("--ddp-timeout", type=int, default=180, help="seconds of the ddp fit")
    parser.add_argument("--budget-s", type=float, default=360.0, help="start no new phase after this many seconds")
    parser.add_argument("--workdir", help="keep the synthetic stores and logs here (default: a temporary folder)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "gpu_check.json"), help="the JSON of the figures")
    ns = parser.parse_args(argv)
    if ns.dry_run:
        ns.device, ns.tiny, ns.steps, ns.warmup = "cpu", True, min(ns.steps, 2), min(ns.warmup, 1)
    if ns.steps < 1 or ns.warmup < 0:
        raise SystemExit(f"--steps {ns.steps} must be ≥ 1 and --warmup {ns.warmup} ≥ 0")
    device = torch.device(ns.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --dry-run for the CPU check)")
    ns.deadline = time.monotonic() + ns.budget_s
    from lightning_sensorium.atomic import write_text_atomic

    started = time.perf_counter()
    report: dict[str, Any] = {"machine": machine_line("gpu_check.py", argv), "device": str(device)}
    report["size"] = "tiny" if ns.tiny else "full"
    report["precision"] = "bf16 autocast"
    with workdir(ns.workdir) as root:
        t0 = time.perf_counter()
        stores = make_stores(root, ns.tiny)
        report["stores_s"] = time.perf_counter() - t0
        # Cheap and required first, so a spent budget cuts the optional parts: eager, the ddp fit, compiled, originals.
        models: dict[str, dict[str, Any]] = {m: {} for m in ns.models}
        report["models"] = models
        for model in ns.models:
            models[model]["eager"] = run_model(model, "eager", stores, device, ns, root / "logs")
            write_text_atomic(ns.out, json.dumps(report, indent=2))  # what is done so far survives a kill
        report["ddp_fit"] = ddp_fit(stores, device, ns, root / "logs") if ns.ddp else {"skipped": "--no-ddp"}
        for model in ns.models:
            compiled = run_model(model, "compiled", stores, device, ns, root / "logs") if ns.compile else None
            models[model]["compiled"] = compiled or {"skipped": "--no-compile"}
            write_text_atomic(ns.out, json.dumps(report, indent=2))
        for model in ns.models:
            models[model]["original"] = versus_original(model, device, ns)
    report["total_s"] = time.perf_counter() - started
    write_text_atomic(ns.out, json.dumps(report, indent=2))
    print(summary(report))
    print(f"\nfigures: {ns.out}")
    return report


def summary(report: dict[str, Any]) -> str:
    """A Markdown table of the figures, for BENCHMARKS.md."""
    lines = [
        report["machine"],
        "",
        "| model | batch × frames | eager samples/s | compiled samples/s | first compiled step (s) "
        "| peak GiB (eager / compiled) | SDPA | vs original |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, e in report["models"].items():
        eager, comp = e["eager"], e["compiled"]
        size = f"{eager['batch']} × {eager['frames']}" if "batch" in eager else "–"
        original = e["original"].get("speed_vs_original") or e["original"].get("skipped") or e["original"].get("error")
        lines.append(
            f"| {model} | {size} | {_cell(eager, 'samples_per_s')} | {_cell(comp, 'samples_per_s')} "
            f"| {_cell(comp, 'first_step_s')} | {_cell(eager, 'peak_gib')} / {_cell(comp, 'peak_gib')} "
            f"| {', '.join(eager.get('sdpa', [])) or '–'} | {original} |"
        )
    lines.append(f"\nddp fit: {report['ddp_fit']}; total {report['total_s']:.0f} s")
    return "\n".join(lines)


def _cell(phase: dict[str, Any], key: str) -> str:
    """``phase[key]`` to one decimal, else why it is missing (skipped, error)."""
    if key in phase:
        return f"{phase[key]:.1f}"
    return str(phase.get("error") or phase.get("skipped") or "–")


if __name__ == "__main__":
    main()
