"""Weight-import fixtures for the starter-kit baselines (GRU, factorized) and DwiseNeuro, written by the original code.

Starter kit: https://github.com/ecker-lab/sensorium_2023 at 49547d96b5d18549aad0f87041ab456d3e4e3e7b with
https://github.com/sinzlab/neuralpredictors at a2055cdad9de1f0c07033484d628588d8aa7acc4. ``make_video_model``
(``sensorium/models/make_model.py``) builds each baseline with ``notebooks/benchmarks_training.ipynb``'s settings
at a tiny size, from stand-in data loaders of two mice; every parameter and BatchNorm statistic is randomised and
``model.state_dict()`` saved with ``torch.save``, as ``sensorium/training/video_training_loop.py`` writes
``final.pth``. Two seeds make an ensemble.

DwiseNeuro: https://github.com/lRomul/sensorium at 6849050e74e2843fbd70b33af110d71638aa37bb. Its argus
``MouseModel`` (``src/argus_models.py``) is built from ``configs/true_batch_001.py``'s and ``distillation_001.py``'s
``argus_params`` at a tiny size (on the CPU, no AMP), randomised, given an EMA (``src/ema.py``'s ``ModelEma``) one
step apart from the raw weights, and saved as argus' ``Checkpoint`` saves the raw model (``Model.save``) and as
``EmaCheckpoint.save_model`` saves the EMA copy (the published files are EMA files). Its outputs are
``argus.load_model(file).predict(inputs, mouse_index)`` on ``StackInputsProcessor``'s inputs, as
``src/predictors.py`` predicts. It needs ``pytorch-argus==1.0.0`` (its requirements.txt):
``pip install --target DIR pytorch-argus==1.0.0``, then ``--deps DIR``.

Each model folder gets ``expected.npz``: the fixed input (``video``, ``behavior``, ``pupil_center``), per mouse the
neurons (``unit_ids/<mouse>``, ``coordinates/<mouse>``) and per file and mouse the original's eval-mode output after
its output activation in our layout ``(B, N, T')`` (``output/<file>/<mouse>``), which ``tests/test_weights.py``
compares our imported checkpoints with. The originals are exported with ``git archive`` from a clone (or bare
mirror) into a temporary folder and imported from there, never installed; what they import but these models do not
run is stubbed (``torchvision``, ``nnfabrik``; ``scipy.special.gamma`` is ``math.gamma``: integer arguments only)::

    python tools/make_weight_fixtures.py --sensorium <sensorium_2023 clone or .git> \
        --neuralpredictors <neuralpredictors clone or .git> --dwiseneuro <lRomul/sensorium clone or .git> \
        --deps DIR [--out tests/fixtures/weights]

ViV1T and Dynamic-V1FM: ``tools/make_weight_fixtures_w2.py``.
"""

# The original modules are reached by attribute: their types are dynamic.
# mypy: disable-error-code="union-attr,index,operator,attr-defined,call-overload,arg-type"

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import types
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

SENSORIUM_COMMIT = "49547d96b5d18549aad0f87041ab456d3e4e3e7b"
NEURALPREDICTORS_COMMIT = "a2055cdad9de1f0c07033484d628588d8aa7acc4"
DWISENEURO_COMMIT = "6849050e74e2843fbd70b33af110d71638aa37bb"
ROOT = Path(__file__).resolve().parents[1]

#: Starter-kit mice: two session folder names of the release (its data keys) and their neuron counts.
STARTER_KIT_MICE = {
    "dynamic29156-11-10-Video-8744edeac3b4d1ce16b680916b5267ce": 12,
    "dynamic29228-2-10-Video-8744edeac3b4d1ce16b680916b5267ce": 15,
}
FRAMES = 16  # the factorized core at these kernels keeps T − 6 frames


def export(repo: str, commit: str, paths: list[str], into: Path) -> Path:
    """``git archive <commit> <paths>`` of a clone or bare repository, extracted into ``into``."""
    git_dir = Path(repo)
    flag = ["--git-dir", str(git_dir)] if not (git_dir / ".git").exists() else ["-C", str(git_dir)]
    archive = subprocess.run(["git", *flag, "archive", commit, *paths], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def randomize(model: nn.Module, seed: int, calibrate: Callable[[], Any] | None = None) -> None:
    """Perturb every trainable parameter at its own scale (×(1 + 0.2 ε), + 0.02 ε: constants such as zero biases
    no longer constant, so a transposition would show, while the gain of each layer and of a recurrence stays that
    of the original's init, as in a trained model); set the BatchNorm statistics from ``calibrate()`` (a forward
    pass in train mode: activations at a trained model's scale) and perturb them too (eval mode must use them, so
    they must differ from the batch's). The original's constants stay."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # not the Hermite basis and rotations (frozen parameters: constants)
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g)).add_(0.02 * torch.randn(p.shape, generator=g))
        if calibrate is not None:
            model.train()
            calibrate()
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.add_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.mul_(0.8 + 0.4 * torch.rand(b.shape, generator=g))
    model.eval()


def neuron_table(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit ids (sorted, 1-based, not contiguous), integer cortical coordinates (µm) and mean responses."""
    ids = np.sort(rng.choice(np.arange(1, 3 * n), size=n, replace=False)).astype(np.int64)
    coords = np.column_stack([rng.uniform(0, 600, (n, 2)), 200 + 25 * rng.integers(0, 10, n)])
    return ids, np.round(coords).astype(np.int64), rng.uniform(0.2, 2.0, n).astype(np.float32)


def inputs(batch: int, frames: int, seed: int) -> dict[str, torch.Tensor]:
    """A fixed input; the video at float16 precision (stored as float16: half the fixture's size)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "video": torch.randn(batch, 1, frames, 36, 64, generator=g).half().float(),
        "behavior": torch.randn(batch, 2, frames, generator=g),
        "pupil_center": torch.randn(batch, 2, frames, generator=g),
    }


# ------------------------------------------------------------------------------------------------ starter kit
def starter_kit_modules(src: Path) -> Any:
    """``sensorium.models.make_model`` from the exported trees, with ``torchvision``/``nnfabrik``/``scipy`` stubbed."""
    sys.path.insert(0, str(src))
    stubs = ("torchvision", "scipy", "scipy.special", "nnfabrik", "nnfabrik.utility", "nnfabrik.utility.nn_helpers")
    for name in stubs:
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["scipy.special"].gamma = np.vectorize(math.gamma, otypes=[np.float64])

    def set_random_seed(seed: int) -> None:  # nnfabrik's: numpy, random and torch seeded
        np.random.seed(seed)
        torch.manual_seed(seed)

    sys.modules["nnfabrik.utility.nn_helpers"].set_random_seed = set_random_seed
    import sensorium.models.make_model as make_model

    return make_model


class StandInLoader:
    """What ``make_video_model`` reads from a data loader: one batch (videos with the behaviour channels, as
    ``AddBehaviorAsChannels`` makes them, responses, behaviour, pupil centre) and ``dataset.neurons``."""

    Batch = namedtuple("Batch", ["videos", "responses", "behavior", "pupil_center"])

    def __init__(self, coordinates: np.ndarray, mean: np.ndarray, batch: dict[str, torch.Tensor]) -> None:
        self.dataset = types.SimpleNamespace(neurons=types.SimpleNamespace(cell_motor_coordinates=coordinates))
        b, _, t, h, w = batch["video"].shape
        video = torch.cat([batch["video"], batch["behavior"][..., None, None].expand(b, 2, t, h, w)], dim=1)
        responses = torch.as_tensor(mean)[None, :, None].expand(b, len(mean), t)  # (B, N, T), mean → the bias init
        self.batch = self.Batch(video, responses.contiguous(), batch["behavior"], batch["pupil_center"])

    def __iter__(self) -> Any:
        return iter([self.batch])


def notebook_settings(architecture: str, full: bool = False) -> dict[str, Any]:
    """``benchmarks_training.ipynb``'s dictionaries, at a tiny size (channels, kernels, GRU) unless ``full``."""
    readout = {
        "bias": True,
        "init_mu_range": 0.2,
        "init_sigma": 1.0,
        "gamma_readout": 0.0,
        "gauss_type": "full",
        "grid_mean_predictor": {
            "type": "cortex",
            "input_dimensions": 2,
            "hidden_layers": 1,
            "hidden_features": 30 if full else 6,
            "final_tanh": True,
        },
        "share_features": False,
        "share_grid": False,
        "shared_match_ids": None,
        "gamma_grid_dispersion": 0.0,
    }
    shifter = {"gamma_shifter": 0, "shift_layers": 3, "input_channels_shifter": 2, "hidden_channels_shifter": 5}
    common = {"readout_dict": readout, "readout_type": "gaussian", "use_shifter": True, "shifter_dict": shifter}
    common["shifter_type"] = "MLP"
    if architecture == "gru":
        core = {
            "input_channels": 3, "hidden_channels": 3, "input_kern": 5, "hidden_kern": 3, "layers": 2,
            "num_rotations": 4, "gamma_input": 500, "skip": 0, "pad_input": False, "final_nonlinearity": False,
            "bias": True, "momentum": 0.9, "batch_norm": True, "hidden_dilation": 1, "laplace_padding": None,
            "input_regularizer": "LaplaceL2norm", "stack": -1, "depth_separable": False, "linear": False,
            "attention_conv": False, "hidden_padding": None, "use_avg_reg": False, "final_batchnorm_scale": True,
            "gamma_hidden": 500_000,
        }  # fmt: skip
        gru = {"input_channels": 12, "rec_channels": 12, "input_kern": 3, "rec_kern": 3, "gamma_rec": 0}
        if full:
            core.update(hidden_channels=8, input_kern=9, hidden_kern=7, layers=4, num_rotations=8)
            gru.update(input_channels=64, rec_channels=64, input_kern=9, rec_kern=9)
        return {**common, "core_dict": core, "core_type": "2D_equivariant", "use_gru": True, "gru_dict": gru}
    core = {
        "input_channels": 3, "hidden_channels": [4, 6], "spatial_input_kernel": (5, 5), "temporal_input_kernel": 4,
        "spatial_hidden_kernel": (3, 3), "temporal_hidden_kernel": 4, "stride": 1, "layers": 2,
        "gamma_input_spatial": 10, "gamma_input_temporal": 0.01, "bias": True, "hidden_nonlinearities": "elu",
        "x_shift": 0, "y_shift": 0, "batch_norm": True, "laplace_padding": None, "input_regularizer": "LaplaceL2norm",
        "padding": False, "final_nonlin": True, "momentum": 0.7,
    }  # fmt: skip
    if full:
        core.update(hidden_channels=[32, 64, 128], spatial_input_kernel=(11, 11), temporal_input_kernel=11, layers=3)
        core.update(spatial_hidden_kernel=(5, 5), temporal_hidden_kernel=5)
    return {**common, "core_dict": core, "core_type": "3D_factorised", "use_gru": False, "gru_dict": None}


def original_output(model: nn.Module, batch: dict[str, torch.Tensor], mouse: str, train: bool = False) -> torch.Tensor:
    """The original's forward on the loader's input (behaviour as channels), eval mode unless ``train``, in our
    ``(B, N, T')``."""
    b, _, t, h, w = batch["video"].shape
    video = torch.cat([batch["video"], batch["behavior"][..., None, None].expand(b, 2, t, h, w)], dim=1)
    model.train(train)
    with torch.no_grad():
        out = model(video, data_key=mouse, pupil_center=batch["pupil_center"])  # (B, T', N)
    return out.transpose(1, 2)  # (B, N, T')


def make_starter_kit(make_model: Any, architecture: str, out: Path, seeds: tuple[int, ...] = (0, 1)) -> None:
    rng = np.random.default_rng(23)
    neurons = {m: neuron_table(rng, n) for m, n in STARTER_KIT_MICE.items()}
    batch = inputs(2, FRAMES, seed=5)
    loaders = {m: StandInLoader(coords, mean, batch) for m, (_, coords, mean) in neurons.items()}
    out.mkdir(parents=True, exist_ok=True)
    expected = {k: v.numpy().astype(np.float16 if k == "video" else np.float32) for k, v in batch.items()}
    for m, (ids, coords, _) in neurons.items():
        expected[f"unit_ids/{m}"], expected[f"coordinates/{m}"] = ids, coords
    for seed in seeds:
        settings = notebook_settings(architecture)
        settings["readout_dict"] = dict(settings["readout_dict"])
        model = make_model.make_video_model(loaders, seed, **settings)
        randomize(model, seed + 100, lambda m=model: [original_output(m, batch, k, train=True) for k in neurons])
        name = f"seed{seed}_final.pth"
        torch.save(model.state_dict(), out / name)  # video_training_loop.py: torch.save(model.state_dict(), ...)
        for m in neurons:
            expected[f"output/{name}/{m}"] = original_output(model, batch, m).numpy()
    np.savez_compressed(out / "expected.npz", **expected)


# ------------------------------------------------------------------------------------------------- DwiseNeuro
#: configs/true_batch_001.py's argus_params at a tiny size (two mice: readouts 0 and 1 of src/constants.py), on the CPU.
DWISENEURO_NEURONS = (12, 15)
DWISENEURO_FRAMES = 8


def dwiseneuro_params(stage: str, full: bool = False, neurons: tuple[int, ...] = DWISENEURO_NEURONS) -> dict[str, Any]:
    """``argus_params`` of ``configs/true_batch_001.py`` (stage 1) or ``distillation_001.py`` (stage 2); unless
    ``full`` tiny: two blocks, a small cortex, 8-frame stacks (stage 2 differs by its expansion, as there). CPU and
    no AMP so that it runs here."""
    if full:
        sizes = {
            "core_features": (64, 64, 64, 64, 128, 128, 128, 256, 256), "spatial_strides": (2, 1, 1, 1, 2, 1, 1, 2, 1),
            "expansion_ratio": 7 if stage == "true_batch_001" else 6, "se_reduce_ratio": 32,
            "cortex_features": (1024, 2048, 4096),
        }  # fmt: skip
    else:
        sizes = {
            "core_features": (4, 8), "spatial_strides": (2, 2), "se_reduce_ratio": 4, "cortex_features": (8, 16),
            "expansion_ratio": 2 if stage == "true_batch_001" else 3,
        }  # fmt: skip
    return {
        "nn_module": ("dwiseneuro", {
            "readout_outputs": neurons, "in_channels": 5, **sizes, "spatial_kernel": 3, "temporal_kernel": 5,
            "groups": 2, "softplus_beta": 0.07, "drop_rate": 0.4, "drop_path_rate": 0.1,
        }),
        "loss": ("mice_poisson", {"log_input": False, "full": False, "eps": 1e-8}),
        "optimizer": ("AdamW", {"lr": 3e-4, "weight_decay": 0.05}),
        "device": "cpu",
        "frame_stack": {"size": 16 if full else DWISENEURO_FRAMES, "step": 2, "position": "last"},
        "inputs_processor": ("stack_inputs", {"size": (64, 64), "pad_fill_value": 0.0}),
        "responses_processor": ("identity", {}),
        "amp": False,
        "iter_size": 1,
    }  # fmt: skip


def dwiseneuro_modules(src: Path) -> types.SimpleNamespace:
    """``MouseModel``, ``ModelEma``, ``EmaCheckpoint``, ``StackInputsProcessor`` and argus from the exported tree."""
    sys.path.insert(0, str(src))
    import argus
    from src.argus_models import MouseModel
    from src.ema import EmaCheckpoint, ModelEma
    from src.inputs import StackInputsProcessor

    return types.SimpleNamespace(
        argus=argus, model=MouseModel, ema=ModelEma, ema_checkpoint=EmaCheckpoint, inputs=StackInputsProcessor
    )


def make_dwiseneuro(orig: types.SimpleNamespace, out: Path) -> None:
    """One fold of each stage: the stage-1 model saved raw (``argus.Model.save``, what argus' ``Checkpoint``
    writes) and its EMA copy (``EmaCheckpoint.save_model``, what the published files are), and a stage-2 EMA file.
    The expected outputs are ``argus.load_model(file).predict(inputs, mouse_index)``, as ``src/predictors.py``."""
    import logging

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(29)
    batch = inputs(2, DWISENEURO_FRAMES, seed=7)
    g = torch.Generator().manual_seed(8)
    batch["video"] = torch.randint(0, 256, batch["video"].shape, generator=g).float()  # raw grey levels
    expected = {k: v.numpy().astype(np.float16 if k == "video" else np.float32) for k, v in batch.items()}
    for i, n in enumerate(DWISENEURO_NEURONS):
        ids, coords, _ = neuron_table(rng, n)
        expected[f"unit_ids/{i}"], expected[f"coordinates/{i}"] = ids, coords
    proc = orig.inputs(size=(64, 64), pad_fill_value=0.0)
    frames = batch["video"][:, 0].permute(0, 2, 3, 1).numpy()  # (B, H, W, T): the release's layout
    x = torch.stack([proc(frames[b], batch["behavior"][b].numpy(), batch["pupil_center"][b].numpy()) for b in range(2)])
    files = []
    for stage, seed in (("true_batch_001", 0), ("distillation_001", 1)):
        torch.manual_seed(seed)
        model = orig.model(dwiseneuro_params(stage))
        randomize(model.nn_module, seed + 100, lambda m=model.nn_module: m(x))
        model.model_ema = orig.ema(model.nn_module, decay=0.5)
        randomize(model.nn_module, seed + 200, lambda m=model.nn_module: m(x))  # a step on: the EMA differs
        model.model_ema.update(model.nn_module)
        if stage == "true_batch_001":
            model.save(out / f"{stage}_fold_0_raw.pth")
            files.append(f"{stage}_fold_0_raw.pth")
        state = types.SimpleNamespace(model=model, logger=logging.getLogger("make_weight_fixtures"))
        orig.ema_checkpoint(out).save_model(state, out / f"{stage}_fold_0_ema.pth")
        files.append(f"{stage}_fold_0_ema.pth")
    for name in files:
        loaded = orig.argus.load_model(out / name, device="cpu", optimizer=None, loss=None)
        for i in range(len(DWISENEURO_NEURONS)):
            expected[f"output/{name}/{i}"] = loaded.predict(x, i).numpy()  # (B, N, T)
    np.savez_compressed(out / "expected.npz", **expected)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sensorium", required=True, help="ecker-lab/sensorium_2023 clone or bare repository")
    parser.add_argument("--neuralpredictors", required=True, help="sinzlab/neuralpredictors clone or bare repository")
    parser.add_argument("--dwiseneuro", help="lRomul/sensorium clone or bare repository")
    parser.add_argument("--deps", type=Path, help="folder with pytorch-argus==1.0.0 (pip install --target DIR)")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "weights")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "starter_kit"
        src.mkdir()
        export(args.neuralpredictors, NEURALPREDICTORS_COMMIT, ["neuralpredictors"], src)
        export(args.sensorium, SENSORIUM_COMMIT, ["sensorium"], src)
        make_model = starter_kit_modules(src)
        for architecture in ("gru", "factorized"):
            make_starter_kit(make_model, architecture, args.out / architecture)
            print(f"wrote {args.out / architecture}")
        if args.dwiseneuro:
            if args.deps:
                sys.path.insert(0, str(args.deps))
            src = Path(tmp) / "dwiseneuro"
            src.mkdir()
            export(args.dwiseneuro, DWISENEURO_COMMIT, ["src"], src)
            make_dwiseneuro(dwiseneuro_modules(src), args.out / "dwiseneuro")
            print(f"wrote {args.out / 'dwiseneuro'}")


if __name__ == "__main__":
    main()
