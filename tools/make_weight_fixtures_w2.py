"""Weight-import fixtures for ViV1T and Dynamic-V1FM, written by the original code itself.

ViV1T: https://github.com/bryanlimy/ViV1T at 765cf77818f97bc12b1d2da7f33133644e0b12ee. Its ``Model``
(``src/viv1t/model/model.py``) is built at a tiny size from an ``args`` namespace with train.py's arguments
(the README command's settings), given random weights, and saved as a run directory: ``args.yaml`` by
``viv1t.utils.yaml.save`` (what ``utils.save_args`` calls) and ``ckpt/model_state.pt`` by
``viv1t.scheduler.Scheduler.save_checkpoint``. Two runs (two seeds) make an ensemble.

Dynamic-V1FM: https://github.com/zhuyu-cs/Dynamic-VFM at 5dc582abfe272384110b7f5d0eed941213565750. Its
``VideoFiringRateEncoder`` (``models/video_encoder.py``) with ``SwinCore``, ``MultipleFullGaussian2d`` (mean and
adaptive fusion) and ``MLPShifter`` as ``make_video_model_{mean,adaptive}`` wire them with
``config/neuroencoding.py``'s settings at a tiny size. Saved as the ``train.py`` runner writes it (mmcv's
``save_checkpoint``: ``{"meta", "state_dict", "optimizer"}``, the ``DataParallel`` wrapper removed) in a work dir
named ``<work_dir>_<fusion>_<mode>`` as ``epoch_<n>.pth``, and as the published ``model_<mode>.pth`` that
``submission_func/*.py`` load into the ``DataParallel`` model (keys prefixed ``module.``).

Each model folder's ``expected.npz`` holds the fixed input, the neurons (``unit_ids/<key>``, ``coordinates/<key>``)
and per file and mouse the original's eval-mode output after its activation, ``(B, N, T')`` (``output/<file>/<key>``),
that ``tests/test_weights_viv1t_dv1fm.py`` compares our imported checkpoints with. The originals are exported with
``git archive`` from a clone (or bare mirror) into a temporary folder and imported from there, never installed; what
they import but the models do not run is stubbed
(``torchinfo``, ``scipy``, the data package, wandb-laden utilities). Both need ``einops``, ViV1T ``ruamel.yaml`` too
(``pip install --target DIR einops ruamel.yaml``, then ``--deps DIR``). The shared helpers (``export``, ``inputs``,
``neuron_table``, ``randomize``) are tools/make_weight_fixtures.py's; ``bench_viv1t`` / ``bench_dynamic_v1fm`` build
the published sizes for benchmarks/bench_import_weights.py::

    python tools/make_weight_fixtures_w2.py --viv1t <ViV1T clone or .git> --dynamic-v1fm <Dynamic-VFM clone> \
        [--deps DIR] [--out tests/fixtures/weights]
"""

# The original modules are reached by attribute: their types are dynamic.
# mypy: disable-error-code="union-attr,index,operator,attr-defined,call-overload,arg-type"

from __future__ import annotations

import argparse
import contextlib
import importlib
import shutil
import sys
import tempfile
import types
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from make_weight_fixtures import export, inputs, neuron_table, randomize  # tools/, beside this file
from torch import nn

VIV1T_COMMIT = "765cf77818f97bc12b1d2da7f33133644e0b12ee"
DYNAMIC_V1FM_COMMIT = "5dc582abfe272384110b7f5d0eed941213565750"
ROOT = Path(__file__).resolve().parents[1]

#: ViV1T mice of the fixture (letters of src/viv1t/data/constants.py) and their neuron counts.
VIV1T_MICE = {"A": 12, "B": 15}
#: Dynamic-V1FM mice (session folder names, as its train.py keys them); its readout needs ≥ 16 neurons.
DYNAMIC_V1FM_MICE = {
    "dynamic29515-10-12-Video-9b4f6a1a067fe51e15306b9628efea20": 16,
    "dynamic29623-4-9-Video-9b4f6a1a067fe51e15306b9628efea20": 20,
}
FRAMES_VIV1T = 30
FRAMES_DYNAMIC = 30  # the original readout reshapes with a hard-coded 15 tokens: exactly 30 frames


@contextmanager
def isolated_modules() -> Iterator[None]:
    """Modules imported or stubbed inside are dropped afterwards (both originals have top-level ``models``/``utils``
    -like packages; the stubs must not outlive the export)."""
    before = dict(sys.modules)
    try:
        yield
    finally:
        for name in set(sys.modules) - set(before):
            del sys.modules[name]
        sys.modules.update(before)


def perturb(model: nn.Module, seed: int, full: bool) -> None:
    """Tiny models: every parameter perturbed (:func:`randomize`). Full size: the original's own random init, only
    the readouts' feature weights drawn N(0, 1/C²) instead of the constant 1/C (so that a transposition shows);
    perturbing every parameter of a deep model by 0.1 makes its exponential outputs overflow float32's precision."""
    if not full:
        randomize(model, seed)
        return
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1].startswith(("features", "_features")):
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1])


# ----------------------------------------------------------------------------------------------------- ViV1T
#: The fixtures' ViV1T core (train.py's defaults, the README model, in the comments).
VIV1T_TINY = {
    "core_spatial_patch_size": 3,  # 7
    "core_spatial_depth": 2,  # 3
    "core_temporal_patch_size": 5,  # 25
    "core_temporal_depth": 1,  # 5
    "core_num_heads": 2,  # 11
    "core_emb_dim": 16,  # 112
    "core_head_dim": 8,  # 48
    "core_mlp_dim": 24,  # 136
}


def viv1t_args(output_dir: Path, mice: dict[str, int], seed: int, core: dict[str, Any]) -> argparse.Namespace:
    """train.py's arguments for the README command (``--transform_mode=2 --crop_frame=140 --ds_mode=3
    --core=vivit --core_parallel_attention --grad_checkpointing=0 --output_mode=1 --readout=gaussian2d
    --batch_size=6``) with its defaults, ``core`` over them, plus what train.py sets before ``save_args``."""
    args = argparse.Namespace(
        data="data/sensorium",
        output_dir=str(output_dir),
        ds_mode=3,
        stat_mode=1,
        transform_mode=2,
        center_crop=1.0,
        mouse_ids=list(mice),
        limit_data=None,
        cache_data=False,
        num_workers=2,
        epochs=400,
        batch_size=6,
        micro_batch_size=6,
        crop_frame=140,
        device=torch.device("cpu"),
        seed=seed,
        deterministic=False,
        precision="32",
        grad_checkpointing=0,
        restore=None,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_eps=1e-8,
        criterion="poisson_correlation",
        ds_scale=1,
        grad_norm=None,
        save_plots=False,
        dpi=120,
        format="svg",
        wandb=None,
        wandb_id=None,
        clear_output_dir=True,
        verbose=0,
        core="vivit",
        core_compile=False,
        readout="gaussian2d",
        shifter_mode=1,
        modulator_mode=0,
        critic_mode=0,
        output_mode=1,
        lr=0.0036,
        core_lr=0.0048,
        weight_decay=0.3939,
        core_weight_decay=0.1789,
        core_behavior_mode=2,
        core_patch_mode=0,
        core_pos_encoding=3,
        core_spatial_patch_size=7,
        core_spatial_patch_stride=2,
        core_spatial_depth=3,
        core_temporal_patch_size=25,
        core_temporal_patch_stride=1,
        core_temporal_depth=5,
        core_num_heads=11,
        core_emb_dim=112,
        core_head_dim=48,
        core_mlp_dim=136,
        core_ff_activation="gelu",
        core_p_dropout=0.1338,
        core_mha_dropout=0.358,
        core_ff_dropout=0.0592,
        core_drop_path=0.0505,
        core_parallel_attention=True,
        core_flash_attention=1,
        core_norm_qk=False,
        pretrain_core=None,
        readout_grid_mode=1,
        readout_bias_mode=2,
        readout_dropout=0.0,
        shifter_layers=3,
        shifter_size=5,
        # set by train.py (data.get_training_ds → utils.set_shapes, get_model, wandb_init, save_args)
        input_shapes={"video": (1, 140, 36, 64), "behavior": (2, 140), "pupil_center": (2, 140)},
        output_shapes={mouse: (n, 140) for mouse, n in mice.items()},
        max_frame=300,  # MAX_FRAME of src/viv1t/data/constants.py
        trainable_params=0,
        use_wandb=False,
        git_hash=VIV1T_COMMIT[:7],
        hostname="fixture",
    )
    vars(args).update(core)
    return args


def viv1t_modules(src: Path) -> dict[str, Any]:
    """The original ``Model``, ``Scheduler`` and ``yaml`` from an exported ``src/`` (package __init__s bypassed)."""
    root = src / "viv1t"
    stubs: dict[str, types.ModuleType] = {}
    for name, sub in [("viv1t", ""), ("viv1t.utils", "utils"), ("viv1t.model", "model")]:
        stubs[name] = types.ModuleType(name)
        stubs[name].__path__ = [str(root / sub)]
    utils = types.ModuleType("viv1t.utils.utils")  # wandb, tqdm, ...: the core needs only support_bf16
    utils.support_bf16 = lambda device: False
    stubs["viv1t.utils.utils"] = utils
    stubs["viv1t.utils"].utils = utils
    data = types.ModuleType("viv1t.data")  # get_model's data helpers; Model itself does not use them
    data.estimate_mean_response = None
    stubs["viv1t.data"] = data
    stubs["torchinfo"] = types.ModuleType("torchinfo")
    scipy = types.ModuleType("scipy")  # the modulators (modulator_mode=0: unused)
    scipy.signal = types.ModuleType("scipy.signal")
    stubs["scipy"], stubs["scipy.signal"] = scipy, scipy.signal
    sys.modules.update(stubs)
    return {
        "Model": importlib.import_module("viv1t.model.model").Model,
        "Scheduler": importlib.import_module("viv1t.scheduler").Scheduler,
        "yaml": importlib.import_module("viv1t.utils.yaml"),
    }


def viv1t_run(
    orig: dict[str, Any],
    run: Path,
    tables: dict[str, tuple[np.ndarray, ...]],
    core: dict[str, Any],
    seed: int,
    x: dict[str, torch.Tensor],
    full: bool = False,
) -> dict[str, np.ndarray]:
    """One ViV1T run on the mice ``tables`` (key → unit ids, coordinates, mean responses), saved in ``run``
    (relative to the working directory, as train.py's ``--output_dir``); the original's outputs on ``x`` per key."""
    args = viv1t_args(run, {m: len(t[0]) for m, t in tables.items()}, seed=seed, core=core)
    torch.manual_seed(seed)
    model = orig["Model"](
        args,
        neuron_coordinates={m: torch.from_numpy(np.asarray(t[1], np.float32)) for m, t in tables.items()},
        mean_responses={m: torch.from_numpy(np.asarray(t[2], np.float32)) for m, t in tables.items()},
    )
    perturb(model, seed=100 + seed, full=full)
    model.eval()
    outputs = {}
    with torch.no_grad():
        for mouse in tables:
            outputs[mouse] = model(x["video"], mouse, x["behavior"], x["pupil_center"])[0].numpy()  # (B, N, T')
    optimizer = torch.optim.AdamW(model.get_parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = orig["Scheduler"](args, model=model, optimizer=optimizer, mode="max")
    orig["yaml"].save(str(run / "args.yaml"), data=dict(vars(args)))  # utils.save_args
    scheduler.save_checkpoint(value=0.25, epoch=7)
    return outputs


def make_viv1t(repo: str, out: Path, runs: int = 2) -> None:
    """``out/viv1t/runs/viv1t_00k/{args.yaml, ckpt/model_state.pt}`` and ``out/viv1t/expected.npz``."""
    rng = np.random.default_rng(23)
    tables = {mouse: neuron_table(rng, n) for mouse, n in VIV1T_MICE.items()}
    x = inputs(2, FRAMES_VIV1T, seed=1)
    expected = {k: v.numpy().astype(np.float16 if k == "video" else np.float32) for k, v in x.items()}
    for mouse, (ids, coords, _) in tables.items():
        expected[f"unit_ids/{mouse}"], expected[f"coordinates/{mouse}"] = ids, coords
    (out / "viv1t").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, isolated_modules(), contextlib.chdir(out / "viv1t"):
        orig = viv1t_modules(export(repo, VIV1T_COMMIT, ["src/viv1t"], Path(tmp)) / "src")
        for k in range(1, runs + 1):
            run = Path("runs") / f"viv1t_{k:03d}"  # the README's layout
            for mouse, y in viv1t_run(orig, run, tables, VIV1T_TINY, k, x).items():
                expected[f"output/{run.name}/{mouse}"] = y
    np.savez_compressed(out / "viv1t" / "expected.npz", **expected)


# ---------------------------------------------------------------------------------------------- Dynamic-V1FM
#: config/neuroencoding.py's core_dict (the published model).
DYNAMIC_PUBLISHED = {
    "in_channels": 1,
    "behavior_dim": 4,
    "patch_size": [2, 2, 2],
    "window_size": [8, 7, 7],
    "emb_dim": 224,
    "num_blocks": 4,
    "num_heads": 4,
    "mlp_dim": 488,
    "t_dropout": 0.0,
    "drop_path": 0.0,
    "bias": True,
    "grad_checkpointing": False,
}
#: The fixtures' core, shrunk (a 4×3×3 window keeps the (V, V) index buffer small).
DYNAMIC_CORE = {**DYNAMIC_PUBLISHED, "window_size": [4, 3, 3], "emb_dim": 32, "num_blocks": 2, "num_heads": 2}
DYNAMIC_CORE["mlp_dim"] = 16
DYNAMIC_READOUT = {
    "bias": True,
    "init_mu_range": 0.3,
    "init_sigma": 0.2,
    "gauss_type": "full",
    "share_features": False,
    "share_grid": False,
    "shared_match_ids": None,
    "gamma_grid_dispersion": 0.0,
}
DYNAMIC_SHIFTER = {"gamma_shifter": 0, "shift_layers": 3, "input_channels_shifter": 2, "hidden_channels_shifter": 16}
#: (file under out/dynamic_v1fm, fusion, infer_mode, format): a train.py run and a published weight file.
DYNAMIC_RUNS = [
    ("NeuroEconding_hierachical_mean_2_8/epoch_3.pth", "mean", "2_8", "runner"),
    ("pretrained_weights_adaptive/model_2_4_8_16.pth", "adaptive", "2_4_8_16", "published"),
]


def dynamic_model(
    orig: dict[str, Any], fusion: str, tables: dict[str, tuple[np.ndarray, ...]], core_dict: dict[str, Any]
) -> nn.Module:
    """``make_video_model_{fusion}`` without its data loaders: core, readouts and shifters wired the same way."""
    core = orig["SwinCore"](**core_dict)
    with torch.no_grad():  # get_module_output: the core's (C, T', H', W') → in_shape (C, H', W')
        c, _, h, w = core(torch.zeros(1, 1, FRAMES_DYNAMIC, 36, 64), torch.zeros(1, 2, 30), torch.zeros(1, 2, 30))[
            0
        ].shape
    grid_predictor, grid_type, source_grids = orig["prepare_grid"](
        {"type": "cortex", "input_dimensions": 2, "hidden_layers": 1, "hidden_features": 32, "final_tanh": True},
        {
            mouse: types.SimpleNamespace(
                dataset=types.SimpleNamespace(
                    neurons=types.SimpleNamespace(cell_motor_coordinates=t[1].astype(np.float64))
                )
            )
            for mouse, t in tables.items()
        },
    )
    readout = orig[f"readout_{fusion}"](
        in_shape_dict=dict.fromkeys(tables, (c, h, w)),
        n_neurons_dict={mouse: len(t[0]) for mouse, t in tables.items()},
        mean_activity_dict={mouse: torch.from_numpy(t[2]) for mouse, t in tables.items()},
        grid_mean_predictor=grid_predictor,
        grid_mean_predictor_type=grid_type,
        source_grids=source_grids,
        **DYNAMIC_READOUT,
    )
    shifter = orig["MLPShifter"](data_keys=list(tables), **DYNAMIC_SHIFTER)
    return orig["VideoFiringRateEncoder"](core=core, readout=readout, shifter=shifter)


def save_runner_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path, epoch: int) -> None:
    """mmcv 0.5.5's ``Runner.save_checkpoint`` → ``save_checkpoint`` (the version environment.yml pins):
    https://github.com/open-mmlab/mmcv/blob/v0.5.5/mmcv/runner/checkpoint.py (meta, CPU weights, optimizer)."""
    meta = {"epoch": epoch, "iter": epoch * 120, "mmcv_version": "0.5.5", "time": "Thu Jan  1 00:00:00 1970"}
    state = OrderedDict((k, v.cpu()) for k, v in model.state_dict().items())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": meta, "state_dict": state, "optimizer": optimizer.state_dict()}, path)


def dynamic_modules(src: Path) -> dict[str, Any]:
    """The original's modules from an exported tree (``models/``), imported from there."""
    sys.path.insert(0, str(src))
    try:
        return {
            "SwinCore": importlib.import_module("models.swin_core").SwinCore,
            "readout_mean": importlib.import_module("models.readouts_mean").MultipleFullGaussian2d,
            "readout_adaptive": importlib.import_module("models.readouts_adaptive").MultipleFullGaussian2d,
            "MLPShifter": importlib.import_module("models.shifters").MLPShifter,
            "VideoFiringRateEncoder": importlib.import_module("models.video_encoder").VideoFiringRateEncoder,
            "prepare_grid": importlib.import_module("models.utility").prepare_grid,
        }
    finally:
        sys.path.remove(str(src))


def dynamic_run(
    orig: dict[str, Any],
    path: Path,
    tables: dict[str, tuple[np.ndarray, ...]],
    core: dict[str, Any],
    fusion: str,
    mode: str,
    layout: str,
    seed: int,
    x: dict[str, torch.Tensor],
    full: bool = False,
) -> dict[str, np.ndarray]:
    """One Dynamic-V1FM model saved at ``path`` (``runner`` or ``published`` layout); its outputs ``(B, N, T')``."""
    torch.manual_seed(42)  # config/neuroencoding.py: seed=42
    model = dynamic_model(orig, fusion, tables, core)
    perturb(model, seed=seed, full=full)
    model.eval()
    outputs = {}
    with torch.no_grad():
        for mouse in tables:
            y = model(
                x["video"], data_key=mouse, behavior=x["behavior"], pupil_center=x["pupil_center"], infer_mode=mode
            )
            outputs[mouse] = y.transpose(1, 2).numpy()  # (B, T', N) → (B, N, T'), ours
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "runner":
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.001, betas=(0.9, 0.999), weight_decay=0.05)
        save_runner_checkpoint(model, optimizer, path, epoch=3)
    else:  # submission_func/*.py: torch.load(...) → DataParallel(model).load_state_dict(weight, strict=True)
        torch.save(nn.DataParallel(model).state_dict(), path)
    return outputs


def make_dynamic_v1fm(repo: str, out: Path) -> None:
    """``out/dynamic_v1fm/<run>`` (see DYNAMIC_RUNS), ``expected.npz`` and the original's config
    (``neuroencoding.py.txt``: a ``.py`` there would be linted as ours)."""
    rng = np.random.default_rng(29)
    tables = {mouse: neuron_table(rng, n) for mouse, n in DYNAMIC_V1FM_MICE.items()}
    x = inputs(2, FRAMES_DYNAMIC, seed=2)
    expected = {k: v.numpy().astype(np.float16 if k == "video" else np.float32) for k, v in x.items()}
    for mouse, (ids, coords, _) in tables.items():
        expected[f"unit_ids/{mouse}"], expected[f"coordinates/{mouse}"] = ids, coords
    with tempfile.TemporaryDirectory() as tmp, isolated_modules():
        src = export(repo, DYNAMIC_V1FM_COMMIT, ["models", "config"], Path(tmp))
        (out / "dynamic_v1fm").mkdir(parents=True, exist_ok=True)  # the published sizes, to check a config against
        shutil.copy(src / "config" / "neuroencoding.py", out / "dynamic_v1fm" / "neuroencoding.py.txt")
        orig = dynamic_modules(src)
        for k, (name, fusion, mode, layout) in enumerate(DYNAMIC_RUNS, start=1):
            path = out / "dynamic_v1fm" / name
            for mouse, y in dynamic_run(orig, path, tables, DYNAMIC_CORE, fusion, mode, layout, 200 + k, x).items():
                expected[f"output/{path.name}/{mouse}"] = y
    np.savez_compressed(out / "dynamic_v1fm" / "expected.npz", **expected)


# ------------------------------------------------------------------------- published sizes (bench_import_weights)
#: Where benchmarks/bench_import_weights.py has each original written (the names carry what the readers need).
BENCH_FILES = {"viv1t": "runs/viv1t_001", "dynamic_v1fm": "NeuroEconding_hierachical_mean_2_4_8_16/epoch_180.pth"}


def _tables(mice: Mapping[str, Any]) -> dict[str, tuple[np.ndarray, ...]]:
    """Store mouse id → (unit ids, coordinates, mean responses = 1) of ``MouseStore``-like objects."""
    return {m: (s.unit_ids, s.coordinates, np.ones(len(s.unit_ids), np.float32)) for m, s in mice.items()}


def bench_viv1t(
    repo: str | None, mice: Mapping[str, Any], batch: dict[str, torch.Tensor], out: Path
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The README model (train.py's defaults, its own init) on the stores' neurons as mice ``A``, ``B``, …, saved
    as the run directory ``out``; its outputs per store mouse, and letter → mouse id."""
    if not repo:
        raise SystemExit("--models viv1t needs --viv1t <a clone or .git of https://github.com/bryanlimy/ViV1T>")
    letters = dict(zip("ABCDEFGHIJ", mice, strict=False))
    tables = _tables({k: mice[m] for k, m in letters.items()})
    with tempfile.TemporaryDirectory() as tmp, isolated_modules():
        orig = viv1t_modules(export(repo, VIV1T_COMMIT, ["src/viv1t"], Path(tmp)) / "src")
        outputs = viv1t_run(orig, out, tables, {}, 1, batch, full=True)
    return {letters[k]: y for k, y in outputs.items()}, letters


def bench_dynamic_v1fm(
    repo: str | None, mice: Mapping[str, Any], batch: dict[str, torch.Tensor], out: Path
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """config/neuroencoding.py's model (its own init, mean fusion of all levels) on the stores' neurons, saved as the
    train.py runner writes ``out``; its outputs per store mouse (the original's keys are the mouse ids)."""
    if not repo:
        raise SystemExit("--models dynamic_v1fm needs --dynamic-v1fm <a clone or .git of zhuyu-cs/Dynamic-VFM>")
    with tempfile.TemporaryDirectory() as tmp, isolated_modules():
        orig = dynamic_modules(export(repo, DYNAMIC_V1FM_COMMIT, ["models"], Path(tmp)))
        outputs = dynamic_run(
            orig, out, _tables(mice), DYNAMIC_PUBLISHED, "mean", "2_4_8_16", "runner", 1, batch, full=True
        )  # fmt: skip
    return outputs, {m: m for m in mice}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--viv1t", help="clone (or bare .git) of https://github.com/bryanlimy/ViV1T")
    parser.add_argument("--dynamic-v1fm", help="clone (or bare .git) of https://github.com/zhuyu-cs/Dynamic-VFM")
    parser.add_argument("--deps", help="extra sys.path folder with einops and ruamel.yaml (pip install --target)")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "weights")
    args = parser.parse_args(argv)
    if args.deps:
        sys.path.insert(0, args.deps)
    torch.set_num_threads(1)
    if args.viv1t:
        make_viv1t(args.viv1t, args.out)
    if args.dynamic_v1fm:
        make_dynamic_v1fm(args.dynamic_v1fm, args.out)


if __name__ == "__main__":
    main()
