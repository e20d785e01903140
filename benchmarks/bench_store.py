"""Data-loading benchmark: random 80-frame windows from the zarr store vs the official per-trial .npy layout.

Builds a full-size-like mouse in the official layout (float32 .npy, time last, NaN padding to T_pad = 324, the
partially NaN last frame; sparse heavy-tailed responses; integer grey-level videos) with plain numpy, converts it,
then reads the same random windows (all four arrays) side by side in one run, warm and cold:

* ``store``      — ``MouseStore.read`` (raw values; what the datamodule reads);
* ``store+norm`` — the same plus the official per-frame normalisation (the datamodule's whole read path);
* ``npy mmap``   — ``np.load(mmap_mode="r")`` of the four per-trial files, window sliced and copied;
* ``official``   — the official loader's path: ``np.load`` of the whole trial of every key, ``NeuroNormalizer``
                   per-frame normalisation of the whole trial, then the window.

Cold: before every window, the page cache of the files that window reads (that trial's four .npy files, or its
store chunks) is dropped with ``posix_fadvise(DONTNEED)``, outside the timed region — every window is a first read
from disk. Warm: a second pass over the same windows. ``--layouts`` also times other responses layouts through the
zarr API (the measurements behind the chosen one). Appends a dated entry with machine info and the exact command to
BENCHMARKS.md.

    python benchmarks/bench_store.py [--neurons 8000] [--trials 32] [--windows 200] [--out /tmp/bench_store]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lightning_sensorium.data.convert import convert
from lightning_sensorium.data.normalization import Normalizer, response_precision
from lightning_sensorium.data.store import MouseStore

KEYS = ("videos", "responses", "behavior", "pupil_center")
WINDOW = 80
T_PAD, LENGTH, H, W = 324, 300, 36, 64
STAT_TRIALS = 16


# ------------------------------------------------------------------------------------------------ the mouse
def _video(rng: np.random.Generator) -> np.ndarray:
    """``(H, W, T_pad)`` integer grey levels: smooth moving blobs + pixel noise; NaN after the trial."""
    coarse = rng.normal(size=(LENGTH // 10 + 2, H // 4, W // 4))
    t = np.linspace(0, len(coarse) - 1.001, LENGTH)
    lo, frac = t.astype(int), (t % 1)[:, None, None]
    frames = (1 - frac) * coarse[lo] + frac * coarse[lo + 1]  # (T, 9, 16), smooth in time
    frames = np.kron(frames, np.ones((1, 4, 4))) + 0.3 * rng.normal(size=(LENGTH, H, W))
    video = np.full((H, W, T_PAD), np.nan, dtype=np.float32)
    video[..., :LENGTH] = np.clip(np.round(80 + 55 * frames), 0, 255).transpose(1, 2, 0)
    video[: H // 3, :, LENGTH - 1] = np.nan  # the release's partially NaN last frame
    return video


def build_release(root: Path, neurons: int, trials: int, seed: int = 0) -> Path:
    """One mouse in the official layout (every trial in the train tier), with its per-frame statistics."""
    rng = np.random.default_rng(seed)
    session = root / "benchmouse-0-0-Video-bench"
    for key in KEYS:
        (session / "data" / key).mkdir(parents=True, exist_ok=True)
    kept: dict[str, list[np.ndarray]] = {k: [] for k in KEYS}
    for i in range(trials):
        responses = np.full((neurons, T_PAD), np.nan, dtype=np.float32)
        active = rng.random((neurons, LENGTH)) < 0.3  # ~70 % zeros, gamma tail (max in the hundreds)
        responses[:, :LENGTH] = np.where(active, rng.gamma(0.6, 6.0, size=(neurons, LENGTH)), 0.0)
        behavior = np.stack([rng.normal(45, 8, T_PAD), np.abs(rng.normal(2, 4, T_PAD))]).astype(np.float32)
        pupil = np.full((2, T_PAD), np.nan, dtype=np.float32)
        pupil[:, :LENGTH] = rng.normal(140, 5, (2, LENGTH))
        for key, arr in zip(KEYS, (_video(rng), responses, behavior, pupil), strict=True):
            np.save(session / "data" / key / f"{i}.npy", arr)
            if i < STAT_TRIALS:
                kept[key].append(arr)
    meta = session / "meta"
    (meta / "trials").mkdir(parents=True, exist_ok=True)
    np.save(meta / "trials/tiers.npy", np.array(["train"] * trials))
    (meta / "neurons").mkdir(parents=True, exist_ok=True)
    np.save(meta / "neurons/unit_ids.npy", np.arange(1, neurons + 1))
    np.save(meta / "neurons/cell_motor_coordinates.npy", rng.integers(0, 1000, (neurons, 3)))
    functions = {"mean": np.nanmean, "std": np.nanstd, "min": np.nanmin, "max": np.nanmax, "median": np.nanmedian}
    for key, arrays in kept.items():
        stack = np.stack(arrays)
        d = meta / "statistics" / key / "all"
        d.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN frames → NaN statistics, as in the release
            for stat, fn in functions.items():
                np.save(d / f"{stat}.npy", fn(stack, axis=0).astype(np.float32))
    return session


# ----------------------------------------------------------------------------------------------- measuring
def drop_cache(paths: list[Path]) -> None:
    """Evict the files' pages from the page cache (they must be clean: ``os.sync()`` once after writing)."""
    for p in paths:
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


Method = tuple[Callable[[int, int], object], Callable[[int], list[Path]], int]


def measure(methods: dict[str, Method], plan: list[tuple[int, int]]) -> dict[str, dict[str, float]]:
    """Windows/s and median ms per method, cold then warm. Methods take turns window by window, so that the load
    of a shared machine hits them alike; cold drops the page cache of each window's files first (untimed)."""
    times: dict[str, dict[str, list[float]]] = {m: {"cold": [], "warm": []} for m in methods}
    for cache in ("cold", "warm"):
        if cache == "warm":  # warm-up pass: every window's files in the page cache
            for fn, _, n in methods.values():
                for trial, start in plan[:n]:
                    fn(trial, start)
        for k, (trial, start) in enumerate(plan):
            for name, (fn, files, n) in methods.items():
                if k >= n:
                    continue
                if cache == "cold":
                    drop_cache(files(trial))
                t0 = time.perf_counter()
                fn(trial, start)
                times[name][cache].append(time.perf_counter() - t0)
    return {
        name: {
            **{c: len(t) / sum(t) for c, t in ts.items()},
            **{f"{c}_ms": 1e3 * float(np.median(t)) for c, t in ts.items()},
        }
        for name, ts in times.items()
    }


def du(path: Path) -> int:
    """Bytes on disk (allocated blocks) under ``path``."""
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor() or "?",
    )
    mem = next(
        (
            int(line.split()[1]) // 2**20
            for line in Path("/proc/meminfo").read_text().splitlines()
            if "MemTotal" in line
        ),
        0,
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.machine()}, {os.cpu_count()} cores ({cpu}), {mem} GiB RAM, Python {platform.python_version()}, "
        f"{platform.platform()}; load average {load:.1f} at start (shared machine)"
    )


def layout_alternatives(session: Path, out: Path, plan: list[tuple[int, int]]) -> list[str]:
    """Responses alone (first 24 trials), other layouts read through the zarr API: MiB and windows/s (the evidence)."""
    import zarr
    from zarr.codecs import BloscCodec

    n = min(24, len(list((session / "data" / "responses").glob("*.npy"))))  # the first trials are enough here
    plan = [(trial, t) for trial, t in plan if trial < n]
    first = np.load(session / "data/responses/0.npy")
    neurons = first.shape[0]
    lz4 = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
    zstd = BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")
    layouts = {
        "raw, chunk = trial (store format), zarr API": {"chunks": (1, T_PAD, neurons), "compressors": None},
        "raw, chunks of 27 frames": {"chunks": (1, 27, neurons), "compressors": None},
        "Blosc lz4+shuffle, chunks of 27 frames": {"chunks": (1, 27, neurons), "compressors": lz4},
        "Blosc zstd1+shuffle, chunks of 27 frames": {"chunks": (1, 27, neurons), "compressors": zstd},
        "sharded per trial, lz4 inner chunks of 27 frames": {
            "shards": (1, T_PAD, neurons),
            "chunks": (1, 27, neurons),
            "compressors": lz4,
        },
    }
    rows = []
    for name, kwargs in layouts.items():
        path = out / "layouts" / f"{len(rows)}.zarr"
        arr = zarr.create_array(path, shape=(n, T_PAD, neurons), dtype=np.float32, fill_value=0, **kwargs)
        for i in range(n):
            arr[i] = np.nan_to_num(np.load(session / f"data/responses/{i}.npy")).T
        os.sync()
        files = sorted(p for p in path.rglob("*") if p.is_file())
        method = (lambda trial, t, arr=arr: arr[trial, t : t + WINDOW], lambda _t, files=files: files, len(plan) // 2)
        r = measure({name: method}, plan)[name]
        rows.append(f"| {name} | {du(path) / 2**20:.0f} | {r['cold']:.0f} | {r['warm']:.0f} |")
        shutil.rmtree(path)
    return [
        "| responses layout (zarr API, no fast path) | MiB | cold windows/s | warm windows/s |",
        "|---|---|---|---|",
        *rows,
    ]


def main(argv: list[str] | None = None) -> None:  # noqa: C901 - one linear script
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--neurons", type=int, default=8000)
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--windows", type=int, default=200, help="windows per method and cache state")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_store"), help="scratch folder (deleted first)")
    parser.add_argument("--layouts", action="store_true", help="also time other responses layouts through zarr")
    parser.add_argument("--results", type=Path, default=Path(__file__).parents[1] / "BENCHMARKS.md")
    ns = parser.parse_args(argv)
    if not hasattr(os, "posix_fadvise"):
        sys.exit("needs os.posix_fadvise (Linux) to drop the page cache")

    info = machine()
    shutil.rmtree(ns.out, ignore_errors=True)
    t0 = time.perf_counter()
    session = build_release(ns.out / "release", ns.neurons, ns.trials)
    t1 = time.perf_counter()
    (store_path,) = convert([session], ns.out / "stores", progress=False)
    t2 = time.perf_counter()
    os.sync()  # dirty pages cannot be dropped
    print(f"built {ns.trials} trials × {ns.neurons} neurons in {t1 - t0:.0f} s, converted in {t2 - t1:.0f} s")

    store = MouseStore(store_path)
    normalizer = Normalizer(store)
    stats = {k: {s: np.load(session / f"meta/statistics/{k}/all/{s}.npy") for s in ("mean", "std")} for k in KEYS}
    precision = response_precision(stats["responses"]["std"].T).T  # (N, T)

    def npy_files(trial: int) -> list[Path]:
        return [session / "data" / k / f"{trial}.npy" for k in KEYS]

    def store_files(trial: int) -> list[Path]:
        return [store_path / "videos/c" / str(trial) / "0/0/0", store_path / "responses/c" / str(trial) / "0/0"]

    def read_store(trial: int, t: int) -> object:
        return store.read(trial, t, t + WINDOW)

    def read_store_norm(trial: int, t: int) -> object:
        return normalizer(store.read(trial, t, t + WINDOW), np.arange(t, t + WINDOW))

    def read_mmap(trial: int, t: int) -> object:
        return {
            k: np.array(np.load(p, mmap_mode="r")[..., t : t + WINDOW])
            for k, p in zip(KEYS, npy_files(trial), strict=True)
        }

    def read_official(trial: int, t: int) -> object:
        x = {k: np.load(p) for k, p in zip(KEYS, npy_files(trial), strict=True)}
        x["videos"] = (x["videos"] - stats["videos"]["mean"]) / stats["videos"]["std"]
        x["responses"] = x["responses"] * precision
        x["behavior"] = x["behavior"] * (1 / stats["behavior"]["std"])
        x["pupil_center"] = (x["pupil_center"] - stats["pupil_center"]["mean"]) / stats["pupil_center"]["std"]
        return {k: v[..., t : t + WINDOW] for k, v in x.items()}

    rng = np.random.default_rng(1)
    plan = [
        (int(rng.integers(ns.trials)), int(rng.integers(0, store.length[0] - WINDOW + 1))) for _ in range(ns.windows)
    ]
    methods: dict[str, Method] = {
        "store": (read_store, store_files, ns.windows),
        "store+norm": (read_store_norm, store_files, ns.windows),
        "npy mmap": (read_mmap, npy_files, ns.windows),
        "official": (read_official, npy_files, max(20, ns.windows // 4)),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the official path divides by NaN statistics
        results = measure(methods, plan)

    npy_bytes, release_bytes, store_bytes = du(session / "data"), du(session), du(store_path)
    lines = [
        "| method | cold windows/s | cold median ms | warm windows/s | warm median ms |",
        "|---|---|---|---|---|",
        *(
            f"| {m} | {r['cold']:.0f} | {r['cold_ms']:.2f} | {r['warm']:.0f} | {r['warm_ms']:.2f} |"
            for m, r in results.items()
        ),
    ]

    def ratio(a: str, b: str) -> str:
        r = results
        return (
            f"cold {r[a]['cold'] / r[b]['cold']:.1f}× ({r[b]['cold_ms'] / r[a]['cold_ms']:.1f}× by median), "
            f"warm {r[a]['warm'] / r[b]['warm']:.1f}× ({r[b]['warm_ms'] / r[a]['warm_ms']:.1f}× by median)"
        )

    per_window = WINDOW * (ns.neurons * 4 + H * W)  # bytes the store reads per window (behaviour is in memory)
    per_trial = sum((session / "data" / k / "0.npy").stat().st_size for k in KEYS)
    summary = (
        f"Speed-ups, windows/s ratio (median-latency ratio): store / official: {ratio('store', 'official')}; "
        f"store / npy mmap: {ratio('store', 'npy mmap')}; store+norm / official: {ratio('store+norm', 'official')}. "
        f"Bytes read per window: store {per_window / 1e6:.2f} MB, official {per_trial / 1e6:.1f} MB. "
        f"On disk: store {store_bytes / 2**20:.0f} MiB (everything), release {release_bytes / 2**20:.0f} MiB "
        f"({store_bytes / release_bytes:.2f}×), of which data/*.npy {npy_bytes / 2**20:.0f} MiB "
        f"({store_bytes / npy_bytes:.2f}×). Conversion {t2 - t1:.0f} s ({ns.trials / (t2 - t1):.1f} trials/s)."
    )
    print("\n".join(lines), summary, sep="\n")
    layout_lines = layout_alternatives(session, ns.out, plan) if ns.layouts else []
    if layout_lines:
        print("\n".join(layout_lines))

    command = "python benchmarks/bench_store.py " + " ".join(sys.argv[1:] if argv is None else argv)
    entry = [
        f"\n## Store read throughput — {dt.date.today().isoformat()}",
        "",
        f"Machine: {info}. Command: `{command.strip()}`. Mouse: {ns.neurons} neurons × {ns.trials} trials × "
        f"T_pad {T_PAD}; {ns.windows} random {WINDOW}-frame windows of all four arrays (official: "
        f"{methods['official'][2]}); cold = that window's files dropped from the page cache before it.",
        "",
        *lines,
        "",
        summary,
        *(["", *layout_lines] if layout_lines else []),
        "",
    ]
    with open(ns.results, "a") as f:
        f.write("\n".join(entry))
    print(f"appended to {ns.results}")
    shutil.rmtree(ns.out, ignore_errors=True)


if __name__ == "__main__":
    main()
