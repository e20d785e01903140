"""Quality in a fixed CPU budget: each experiment's CPU-sized demo model vs the ground-truth oracle.

For every config given (default: the six models), runs ``python -m lightning_sensorium.demo --config CONFIG
--minutes M`` in its own process, one after the other (never two trainings at once), and collects the pooled
``final_test_main`` metrics of its ``metrics.json``: single-trial correlation, the ground-truth oracle (the
correlation of the generator's noiseless rates with the recorded responses) and the fraction of it reached. The
demo model sizes are the CPU recipes ``experiments/cpu/<model>.yaml``.

    python benchmarks/bench_quality.py [--minutes 10] [--configs experiments/gru.yaml ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from _report import machine_line

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["factorized", "gru", "dwiseneuro", "dynamic_v1fm", "viv1t"]


def run(config: str, minutes: float, data: Path, log: Path) -> dict[str, float | str]:
    """One demo run; returns its pooled final_test_main metrics, optimizer steps and wall time."""
    start = time.perf_counter()
    cmd = [
        sys.executable,
        "-m",
        "lightning_sensorium.demo",
        "--data",
        str(data),
        "--minutes",
        str(minutes),
        "--config",
        config,
    ]
    with log.open("w") as out:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)
    text = log.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}:\n{text[-3000:]}")
    metrics_path = re.findall(r"^metrics: (.+)$", text, flags=re.M)[-1].strip()
    results = json.loads((ROOT / metrics_path).read_text())
    ckpt = torch.load(ROOT / results["checkpoint"], map_location="cpu", weights_only=False)
    pooled = results["tiers"]["final_test_main"]["pooled"]
    return {**pooled, "steps": int(ckpt["global_step"]), "wall_s": time.perf_counter() - start, "log": str(log)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget per model")
    parser.add_argument("--configs", nargs="+", default=[f"experiments/{c}.yaml" for c in CONFIGS])
    parser.add_argument("--data", type=Path, default=ROOT / "data", help="demo data folder")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_quality"), help="logs and a JSON summary")
    ns = parser.parse_args(argv)
    ns.out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for config in ns.configs:
        name = Path(config).stem
        print(f"training {name} for {ns.minutes} minutes ...", flush=True)
        try:
            rows[name] = run(config, ns.minutes, ns.data, ns.out / f"{name}.log")
        except RuntimeError as err:  # one model's failure must not cost the others' runs
            print(f"  {name} FAILED: {err}", flush=True)
            continue
        print(f"  {name}: {json.dumps(rows[name])}", flush=True)
        (ns.out / "summary.json").write_text(json.dumps(rows, indent=2))
    print(f"\n{machine_line('bench_quality.py', argv)}\n")
    print("| model | optimizer steps | single-trial corr | ground-truth corr | fraction of ground truth |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['steps']} | {r['single_trial_corr']:.3f} | {r['ground_truth_corr']:.3f} | "
            f"**{r['fraction_of_ground_truth']:.3f}** |"
        )


if __name__ == "__main__":
    main()
