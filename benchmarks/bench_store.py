"""Data-loading benchmark: random 80-frame windows from the zarr store vs the official per-trial .npy layout.

Builds a full-size-like mouse in the official layout (float32 .npy, time last, NaN padding; 8,000 neurons by
default; sparse heavy-tailed responses; integer grey-level videos), converts it, then reads random windows
(all four arrays) side by side in one run, warm and cold cache:

* ``store``          — ``MouseStore.read`` (what the datamodule reads, raw values);
* ``store+norm``     — the same plus the official per-frame normalisation (the datamodule's full path);
* ``npy mmap``       — ``np.load(mmap_mode="r")`` of the four per-trial files, window sliced and copied;
* ``official``       — the official loader's path: ``np.load`` of the whole trial of every key, per-frame
                       normalisation of the whole trial, then the window.

Cold: every file's pages are dropped with ``posix_fadvise(DONTNEED)`` before each pass. Appends a dated entry with
the machine and the exact command to BENCHMARKS.md.

    python benchmarks/bench_store.py [--neurons 8000] [--trials 48] [--windows 200] [--out /tmp/bench_store]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lightning_sensorium.data.convert import convert
from lightning_sensorium.data.normalization import Normalizer, response_precision
from lightning_sensorium.data.store import MouseStore
from lightning_sensorium.data.synthetic import natural_movie

KEYS = ("videos", "responses", "behavior", "pupil_center")
WINDOW = 80
T_PAD, LENGTH = 324, 300


def build_release(root: Path, neurons: int, trials: int, seed: int = 0) -> Path:
    """A mouse in the official layout with realistic value statistics (all trials in the train tier)."""
    rng = np.random.default_rng(seed)
    session = root / "benchmouse-0-0-Video-bench"
    for key in KEYS:
        (session / "data" / key).mkdir(parents=True, exist_ok=True)
    sums = {k: [] for k in KEYS}
    for i in range(trials):
        video = np.full((36, 64, T_PAD), np.nan, dtype=np.float32)
        video[..., :LENGTH] = natural_movie(rng, LENGTH).transpose(1, 2, 0)
        responses = np.full((neurons, T_PAD), np.nan, dtype=np.float32)
        active = rng.random((neurons, LENGTH)) < 0.3  # ~70 % zeros, heavy tail
        responses[:, :LENGTH] = np.where(active, rng.gamma(0.6, 6.0, size=(neurons, LENGTH)), 0.0)
        behavior = np.stack([rng.normal(45, 8, T_PAD), np.abs(rng.normal(2, 4, T_PAD))]).astype(np.float32)
        pupil = np.full((2, T_PAD), np.nan, dtype=np.float32)
        pupil[:, :LENGTH] = rng.normal(140, 5, (2, LENGTH))
        for key, arr in zip(KEYS, (video, responses, behavior, pupil), strict=True):
            np.save(session / "data" / key / f"{i}.npy", arr)
            if i < 16:
                sums[key].append(arr)
    (session / "meta" / "trials").mkdir(parents=True, exist_ok=True)
    np.save(session / "meta/trials/tiers.npy", np.array(["train"] * trials))
    (session / "meta" / "neurons").mkdir(parents=True, exist_ok=True)
    np.save(session / "meta/neurons/unit_ids.npy", np.arange(1, neurons + 1))
    np.save(session / "meta/neurons/cell_motor_coordinates.npy", rng.integers(0, 1000, (neurons, 3)))
    for key, arrs in sums.items():
        stack = np.stack(arrs)
        d = session / "meta" / "statistics" / key / "all"
        d.mkdir(parents=True, exist_ok=True)
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                for stat, fn in (
                    ("mean", np.nanmean),
                    ("std", np.nanstd),
                    ("min", np.nanmin),
                    ("max", np.nanmax),
                    ("median", np.nanmedian),
                ):
                    np.save(d / f"{stat}.npy", fn(stack, axis=0).astype(np.float32))
    return session


def drop_cache(paths: list[Path]) -> None:
    """Evict the files' pages (dirty pages are written back first: DONTNEED skips them otherwise)."""
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def official_stats(session: Path) -> dict[str, dict[str, np.ndarray]]:
    return {k: {s: np.load(session / f"meta/statistics/{k}/all/{s}.npy") for s in ("mean", "std")} for k in KEYS}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--neurons", type=int, default=8000)
    parser.add_argument("--trials", type=int, default=48)
    parser.add_argument("--windows", type=int, default=200, help="windows per method and cache state")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_store"))
    parser.add_argument("--results", type=Path, default=Path(__file__).parents[1] / "BENCHMARKS.md")
    ns = parser.parse_args(argv)

    shutil.rmtree(ns.out, ignore_errors=True)
    t0 = time.perf_counter()
    session = build_release(ns.out / "release", ns.neurons, ns.trials)
    (store_path,) = convert([session], ns.out / "stores", progress=False)
    print(f"built + converted {ns.trials} trials × {ns.neurons} neurons in {time.perf_counter() - t0:.0f} s")

    store = MouseStore(store_path)
    normalizer = Normalizer(store)
    stats = official_stats(session)
    precision = response_precision(stats["responses"]["std"].T).T  # (N, T)
    npy_files = sorted((session / "data").rglob("*.npy"))
    store_files = [p for p in store_path.rglob("*") if p.is_file()]

    def read_store(trial: int, t: int) -> object:
        return store.read(trial, t, t + WINDOW)

    def read_store_norm(trial: int, t: int) -> object:
        return normalizer(store.read(trial, t, t + WINDOW), np.arange(t, t + WINDOW))

    def read_mmap(trial: int, t: int) -> object:
        return {
            k: np.array(np.load(session / "data" / k / f"{trial}.npy", mmap_mode="r")[..., t : t + WINDOW])
            for k in KEYS
        }

    def read_official(trial: int, t: int) -> object:
        x = {k: np.load(session / "data" / k / f"{trial}.npy") for k in KEYS}
        x["videos"] = (x["videos"] - stats["videos"]["mean"]) / stats["videos"]["std"]
        x["responses"] = x["responses"] * precision
        x["behavior"] = x["behavior"] / stats["behavior"]["std"]
        x["pupil_center"] = (x["pupil_center"] - stats["pupil_center"]["mean"]) / stats["pupil_center"]["std"]
        return {k: v[..., t : t + WINDOW] for k, v in x.items()}

    methods: dict[str, tuple[Callable[[int, int], object], list[Path]]] = {
        "store": (read_store, store_files),
        "store+norm": (read_store_norm, store_files),
        "npy mmap": (read_mmap, npy_files),
        "official": (read_official, npy_files),
    }
    rng = np.random.default_rng(1)
    plan = [(int(rng.integers(ns.trials)), int(rng.integers(0, LENGTH - WINDOW))) for _ in range(ns.windows)]
    results: dict[str, dict[str, float]] = {}
    for name, (fn, files) in methods.items():
        n = ns.windows if name != "official" else max(20, ns.windows // 5)
        results[name] = {}
        for cache in ("cold", "warm"):
            if cache == "cold":
                drop_cache(files)
            else:
                for trial, t in plan[:n]:  # warm-up pass over the same windows
                    fn(trial, t)
            start = time.perf_counter()
            for trial, t in plan[:n]:
                fn(trial, t)
            results[name][cache] = n / (time.perf_counter() - start)

    def du(path: Path) -> int:
        return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True).stdout.split()[0])

    npy_bytes, store_bytes = du(session / "data"), du(store_path)
    lines = [
        "| method | cold windows/s | warm windows/s |",
        "|---|---|---|",
        *(f"| {m} | {r['cold']:.1f} | {r['warm']:.1f} |" for m, r in results.items()),
    ]
    ratio = (
        f"store / official: cold {results['store']['cold'] / results['official']['cold']:.1f}×, "
        f"warm {results['store']['warm'] / results['official']['warm']:.1f}×; "
        f"store / mmap: cold {results['store']['cold'] / results['npy mmap']['cold']:.2f}×, "
        f"warm {results['store']['warm'] / results['npy mmap']['warm']:.2f}×; "
        f"store+norm / official: cold {results['store+norm']['cold'] / results['official']['cold']:.1f}×, "
        f"warm {results['store+norm']['warm'] / results['official']['warm']:.1f}×"
    )
    size = (
        f"on disk: store {store_bytes / 2**20:.0f} MiB (incl. metadata), "
        f"per-trial .npy data {npy_bytes / 2**20:.0f} MiB"
    )
    print("\n".join(lines), ratio, size, sep="\n")

    command = "python benchmarks/bench_store.py " + " ".join(sys.argv[1:] if argv is None else argv)
    entry = [
        f"\n## Store read throughput — {dt.date.today().isoformat()}",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{platform.platform()}. Command: `{command.strip()}`. Mouse: {ns.neurons} neurons × {ns.trials} trials × "
        f"T_pad {T_PAD}; random {WINDOW}-frame windows of all four arrays.",
        "",
        *lines,
        "",
        f"{ratio}. {size}.",
        "",
    ]
    with open(ns.results, "a") as f:
        f.write("\n".join(entry))
    print(f"appended to {ns.results}")


if __name__ == "__main__":
    main()
