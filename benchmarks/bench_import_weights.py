"""import-weights at the published sizes: each original built by its own code with random weights, saved in its own
format, imported, and our output compared with the original's (eval mode, batch 1, ``no_grad``).

The originals are built and saved by ``tools/make_weight_fixtures.py``'s functions (the same code that writes the
tests' tiny fixtures) with ``full`` sizes: the starter kit's ``benchmarks_training.ipynb`` settings (GRU and
factorized baselines) and DwiseNeuro's ``configs/true_batch_001.py`` (an EMA argus file). Two synthetic mice of
``--neurons`` neurons are the data (a published mouse has 7,440–8,285); each original's readouts are built on their
neuron coordinates, so the import's checks (neuron counts, readout positions) run as on the release. One model at a
time is in memory with its original's output; peak RSS is reported. ViV1T (the README model, a run directory with
``args.yaml``) and Dynamic-V1FM (``config/neuroencoding.py``'s model, mean fusion of all levels, the runner's
``epoch_180.pth``) come from ``tools/make_weight_fixtures_w2.py``, with their own random init (their readouts'
feature weights drawn at random): ViV1T needs ``einops`` and ``ruamel.yaml`` in ``--deps``. ::

    python benchmarks/bench_import_weights.py --sensorium <sensorium_2023 .git> --neuralpredictors <.git> \
        --dwiseneuro <lRomul/sensorium .git> --viv1t <ViV1T .git> --dynamic-v1fm <Dynamic-VFM .git> --deps DIR \
        [--models gru factorized dwiseneuro viv1t dynamic_v1fm] [--neurons 7900]
"""

# The original modules are reached by attribute: their types are dynamic.
# mypy: disable-error-code="union-attr,index,operator,attr-defined,call-overload,arg-type"

from __future__ import annotations

import argparse
import gc
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import make_weight_fixtures as fixtures  # noqa: E402
import make_weight_fixtures_w2 as fixtures_w2  # noqa: E402

from lightning_sensorium.data.convert import convert  # noqa: E402
from lightning_sensorium.data.store import MouseStore  # noqa: E402
from lightning_sensorium.data.synthetic import synthesize  # noqa: E402
from lightning_sensorium.module import SensoriumModule  # noqa: E402
from lightning_sensorium.weights.importer import import_weights  # noqa: E402

FRAMES = {"gru": 20, "factorized": 30, "dwiseneuro": 16, "viv1t": 40, "dynamic_v1fm": 30}


def make_stores(root: Path, neurons: int) -> tuple[Path, dict[str, MouseStore]]:
    sessions = synthesize(
        root / "release", mice=2, neurons=neurons, train_trials=2, clips_per_tier=1, repeats=1, seed=0,
        progress=False, workers=1,
    )  # fmt: skip
    convert(sessions, root / "stores", progress=False)
    return root / "stores", {s.name: MouseStore(root / "stores" / f"{s.name}.zarr") for s in sessions}


def starter_kit_original(
    architecture: str, src: Path, mice: dict[str, MouseStore], batch: dict[str, torch.Tensor], out: Path
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The baseline at the notebook's sizes on the mice's coordinates, saved as ``final.pth``; its outputs."""
    make_model = fixtures.starter_kit_modules(src)
    loaders = {
        m: fixtures.StandInLoader(s.coordinates, np.ones(len(s.unit_ids), np.float32), batch) for m, s in mice.items()
    }
    model = make_model.make_video_model(loaders, 0, **fixtures.notebook_settings(architecture, full=True))
    fixtures.randomize(model, 100, lambda: [fixtures.original_output(model, batch, m, train=True) for m in mice])
    torch.save(model.state_dict(), out)
    return {m: fixtures.original_output(model, batch, m).numpy() for m in mice}, {m: m for m in mice}


def dwiseneuro_original(
    orig: Any, mice: dict[str, MouseStore], batch: dict[str, torch.Tensor], out: Path
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """DwiseNeuro at ``true_batch_001``'s sizes with an EMA, the EMA saved by ``EmaCheckpoint``; its outputs."""
    import logging

    proc = orig.inputs(size=(64, 64), pad_fill_value=0.0)
    frames = batch["video"][:, 0].permute(0, 2, 3, 1).numpy()  # (B, H, W, T)
    x = torch.stack([proc(frames[0], batch["behavior"][0].numpy(), batch["pupil_center"][0].numpy())])
    neurons = tuple(len(s.unit_ids) for s in mice.values())
    model = orig.model(fixtures.dwiseneuro_params("true_batch_001", full=True, neurons=neurons))
    net = model.nn_module
    fixtures.randomize(net, 100, lambda n=net: n(x))
    model.model_ema = orig.ema(model.nn_module, decay=0.5)
    state = type("State", (), {"model": model, "logger": logging.getLogger("bench_import_weights")})()
    orig.ema_checkpoint(out.parent).save_model(state, out)
    del model, net
    loaded = orig.argus.load_model(out, device="cpu", optimizer=None, loss=None)
    outputs = {m: loaded.predict(x, i).numpy() for i, m in enumerate(mice)}
    return outputs, {str(i): m for i, m in enumerate(mice)}


def run_case(
    architecture: str,
    make_original: Callable[[Path], tuple[dict[str, np.ndarray], dict[str, str]]],
    stores: Path,
    batch: dict[str, torch.Tensor],
    tmp: Path,
) -> dict[str, Any]:
    file = tmp / fixtures_w2.BENCH_FILES.get(architecture, f"{architecture}_original.pth")
    expected, mouse_map = make_original(file)
    gc.collect()
    start = time.perf_counter()
    out = tmp / f"{architecture}.ckpt"
    (ckpt,) = import_weights(architecture, [file], stores, out, mouse_map, ROOT / "experiments")
    seconds = time.perf_counter() - start
    module = SensoriumModule.load_from_checkpoint(ckpt, map_location="cpu").eval()
    worst = 0.0
    with torch.no_grad():
        for mouse, theirs in expected.items():
            ours = module.encoder(batch["video"], mouse, batch["behavior"], batch["pupil_center"])
            worst = max(worst, float(np.abs(ours.numpy() - theirs).max() / np.abs(theirs).max()))
    params = sum(p.numel() for p in module.parameters())
    del module
    gc.collect()
    return {"model": architecture, "parameters": params, "max_rel_diff": worst, "import_s": seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sensorium", help="ecker-lab/sensorium_2023 clone or bare repository")
    parser.add_argument("--neuralpredictors", help="sinzlab/neuralpredictors clone or bare repository")
    parser.add_argument("--dwiseneuro", help="lRomul/sensorium clone or bare repository")
    parser.add_argument("--viv1t", help="bryanlimy/ViV1T clone or bare repository")
    parser.add_argument("--dynamic-v1fm", help="zhuyu-cs/Dynamic-VFM clone or bare repository")
    parser.add_argument(
        "--deps", type=Path, help="folder with pytorch-argus==1.0.0, einops, ruamel.yaml (pip install --target DIR)"
    )
    parser.add_argument("--models", nargs="+", default=["gru", "factorized", "dwiseneuro", "viv1t", "dynamic_v1fm"])
    parser.add_argument("--neurons", type=int, default=7900)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.deps:
        sys.path.insert(0, str(args.deps))
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        stores, mice = make_stores(tmp, args.neurons)
        if {"gru", "factorized"} & set(args.models):
            src = tmp / "starter_kit"
            src.mkdir()
            fixtures.export(args.neuralpredictors, fixtures.NEURALPREDICTORS_COMMIT, ["neuralpredictors"], src)
            fixtures.export(args.sensorium, fixtures.SENSORIUM_COMMIT, ["sensorium"], src)
        if "dwiseneuro" in args.models:
            dsrc = tmp / "dwiseneuro"
            dsrc.mkdir()
            fixtures.export(args.dwiseneuro, fixtures.DWISENEURO_COMMIT, ["src"], dsrc)
            orig = fixtures.dwiseneuro_modules(dsrc)
        for architecture in args.models:
            batch = fixtures.inputs(1, FRAMES[architecture], seed=5)
            if architecture == "dwiseneuro":
                batch["video"] = (batch["video"] * 40 + 128).round().clamp(0, 255)  # raw grey levels

                def make(file: Path, b: dict[str, torch.Tensor] = batch) -> Any:
                    return dwiseneuro_original(orig, mice, b, file)
            elif architecture in ("viv1t", "dynamic_v1fm"):
                bench_w2 = fixtures_w2.bench_viv1t if architecture == "viv1t" else fixtures_w2.bench_dynamic_v1fm
                repo = args.viv1t if architecture == "viv1t" else args.dynamic_v1fm

                def make(file: Path, b: dict[str, torch.Tensor] = batch, f: Any = bench_w2, r: str = repo) -> Any:
                    return f(r, mice, b, file)
            else:

                def make(file: Path, b: dict[str, torch.Tensor] = batch, a: str = architecture) -> Any:
                    return starter_kit_original(a, src, mice, b, file)

            row = run_case(architecture, make, stores, batch, tmp)
            row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            print(
                f"{row['model']}: {row['parameters']:,} parameters, max |ours − original| / max |original| = "
                f"{row['max_rel_diff']:.2e}, import {row['import_s']:.1f} s, peak RSS {row['peak_rss_gib']:.2f} GiB",
                flush=True,
            )
            rows.append(row)
    print(f"\ncommand: python benchmarks/bench_import_weights.py {' '.join(argv or sys.argv[1:])}")


if __name__ == "__main__":
    main()
