"""ViV1T core, ours vs the original: a parity check, then forward+backward throughput side by side.

The original is ``ViViTCore`` of https://github.com/bryanlimy/ViV1T (``src/viv1t/model/core/vivit.py``) with the
README command's settings (``--core_parallel_attention``, ``core_behavior_mode=2``, train.py's tuned defaults). It is
imported from an exported copy of the repository, never installed; only ``vivit.py``, ``core.py`` and ``helper.py``
are executed: the package ``__init__``s are bypassed and ``viv1t.utils.utils`` (wandb, tqdm, ...) is replaced by its
one function the core uses, ``support_bf16``. It needs ``einops`` (``pip install einops``, or ``--deps`` pointing at a
``pip install --target`` folder). Export it once, from any clone::

    mkdir -p /tmp/viv1t_orig && git -C <clone> archive HEAD src/viv1t | tar -x -C /tmp/viv1t_orig

Parity: the original's parameters are copied into ours (same order and shapes), and both run on the same input in
eval mode and in train mode (dropout and DropPath masks from the same seed), for our fused (Conv3d) tokenizer and
for the literal unfold one. Throughput: training mode, ``loss = Σ features²``, one backward; the models alternate
iteration by iteration. On a GPU the original's bf16 autocast is what its submitted runs used: pass ``--bf16``.

    python benchmarks/bench_vivit_forward.py [--batch 6] [--frames 140] [--iters 3] [--device cuda] [--bf16]
    python benchmarks/bench_vivit_forward.py --tiny --iters 1   # smoke: a small core, seconds on a CPU
"""

# The original modules are reached by attribute: their types are dynamic.
# mypy: disable-error-code="union-attr,index,operator,attr-defined,call-overload"

from __future__ import annotations

import argparse
import contextlib
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _report import report, time_steps
from torch import Tensor, nn

from lightning_sensorium.models.cores.vivit import ViViTCore
from lightning_sensorium.weights.viv1t import translate

#: train.py's defaults (= Table 3), as our ViViTCore's argument names.
FULL: dict[str, Any] = {
    "dim": 112,
    "heads": 11,
    "head_dim": 48,
    "ff_dim": 136,
    "spatial_depth": 3,
    "temporal_depth": 5,
    "spatial_patch": 7,
    "spatial_stride": 2,
    "temporal_patch": 25,
    "patch_dropout": 0.1338,
    "attention_dropout": 0.358,
    "ff_dropout": 0.0592,
    "drop_path": 0.0505,
}
TINY: dict[str, Any] = {**FULL, "dim": 16, "heads": 2, "head_dim": 8, "ff_dim": 24, "spatial_depth": 1}
TINY.update(temporal_depth=1, temporal_patch=5)


def import_original(path: str) -> type[nn.Module]:
    """The original ``ViViTCore`` class from an exported ``src/viv1t`` tree (see the module docstring)."""
    root = Path(path) / "src" / "viv1t"
    if not (root / "model" / "core" / "vivit.py").is_file():
        raise SystemExit(f"--original {path}: no src/viv1t/model/core/vivit.py there (export it first, see --help)")
    packages = [("viv1t", ""), ("viv1t.model", "model"), ("viv1t.model.core", "model/core")]
    packages += [("viv1t.model.readout", "model/readout"), ("viv1t.utils", "")]
    for name, sub in packages:
        module = types.ModuleType(name)
        module.__path__ = [str(root / sub)]  # submodules import from the tree; the package __init__ is not run
        sys.modules[name] = module
    utils = types.ModuleType("viv1t.utils.utils")

    def support_bf16(device: str | torch.device) -> bool:  # viv1t/utils/utils.py
        kind = device.type if isinstance(device, torch.device) else device
        return kind == "cuda" and torch.cuda.get_device_capability()[0] >= 8

    utils.support_bf16 = support_bf16
    sys.modules["viv1t.utils.utils"] = utils
    sys.modules["viv1t.utils"].utils = utils
    from viv1t.model.core.vivit import ViViTCore as OrigCore

    return OrigCore


def readout_parity(device: torch.device, neurons: int = 50) -> dict[str, float]:
    """Largest |ours − original| of ViV1T's readout (``gaussian2d.py``, state encoder included), eval mode."""
    from viv1t.model.readout.gaussian2d import Gaussian2DReadout

    from lightning_sensorium.data.batch import NeuronInfo
    from lightning_sensorium.models.readouts.vivit import ViViTGaussianReadout

    rng = np.random.default_rng(0)
    coords = rng.uniform(0, 600, (neurons, 3)).astype(np.float32)
    mean = rng.uniform(0.2, 2.0, neurons).astype(np.float32)
    args = argparse.Namespace(readout_bias_mode=2, readout_grid_mode=1, readout_dropout=0.0)
    torch.manual_seed(0)
    original = Gaussian2DReadout(
        args, (16, 4, 15, 29), "mouse", torch.from_numpy(coords), mean_responses=torch.from_numpy(mean)
    ).to(device)
    ours = ViViTGaussianReadout((16, 15, 29), NeuronInfo("mouse", np.arange(neurons), coords, mean)).to(device)
    state = translate({f"readouts.mouse.{k}": v for k, v in original.state_dict().items()}, 1, Path("original"))
    state = {k.removeprefix("encoder.readouts.mouse."): v for k, v in state.items()}  # the importer's mapping
    with torch.no_grad():
        state["features"] = torch.randn_like(state["features"])  # not all equal, so a transposition would show
    ours.load_state_dict(state, strict=True)
    original.features.data.copy_(state["features"].reshape(1, 16, neurons))
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2, 16, 4, 15, 29, generator=g).to(device)
    shift = (0.1 * torch.randn(2, 2, 4, generator=g)).to(device)  # (B, 2, T)
    behavior, pupil = torch.randn(2, 2, 4, generator=g).to(device), torch.randn(2, 2, 4, generator=g).to(device)
    ours.eval()
    original.eval()
    with torch.no_grad():
        a = ours(features, shift.transpose(1, 2), torch.cat([behavior, pupil], 1).transpose(1, 2))
        b = original(features, shifts=shift, behaviors=behavior, pupil_centers=pupil)
    return {
        "readout_source_grid": (ours.source_grid - original.source_grid).abs().max().item(),
        "readout_eval": (a - b).abs().max().item(),
        "readout_scale": b.abs().max().item(),
    }


def original_args(opts: dict[str, Any], frames: int, device: torch.device, bf16: bool) -> argparse.Namespace:
    """The README command's ``args`` for the original core (train.py's tuned defaults)."""
    return argparse.Namespace(
        core_lr=0.0048,
        core_weight_decay=0.1789,
        lr=0.0036,
        weight_decay=0.3939,
        verbose=0,
        device=device,
        precision="bf16" if bf16 else "32",
        core_behavior_mode=2,
        input_shapes={"video": (1, frames, 36, 64), "behavior": (2, frames), "pupil_center": (2, frames)},
        core_emb_dim=opts["dim"],
        core_num_heads=opts["heads"],
        core_head_dim=opts["head_dim"],
        core_mlp_dim=opts["ff_dim"],
        core_spatial_depth=opts["spatial_depth"],
        core_temporal_depth=opts["temporal_depth"],
        core_spatial_patch_size=opts["spatial_patch"],
        core_spatial_patch_stride=opts["spatial_stride"],
        core_temporal_patch_size=opts["temporal_patch"],
        core_temporal_patch_stride=1,
        core_p_dropout=opts["patch_dropout"],
        core_mha_dropout=opts["attention_dropout"],
        core_ff_dropout=opts["ff_dropout"],
        core_drop_path=opts["drop_path"],
        core_parallel_attention=True,
        core_flash_attention=1,
        core_patch_mode=0,
        core_pos_encoding=3,
        core_ff_activation="gelu",
        grad_checkpointing=False,
        max_frame=300,
        mouse_ids=["mouse"],
    )


def build_pair(
    orig_cls: type[nn.Module], opts: dict[str, Any], frames: int, device: torch.device, bf16: bool, fused: bool
) -> tuple[ViViTCore, nn.Module]:
    """Ours and the original, the original's weights loaded into ours by the importer's name mapping
    (:func:`lightning_sensorium.weights.viv1t.translate`; strict: every entry matched, shapes checked)."""
    torch.manual_seed(0)
    original = orig_cls(original_args(opts, frames, device, bf16), input_shape=(1, frames, 36, 64)).to(device)
    ours = ViViTCore(**opts, fused_tokenizer=fused).to(device)
    state = translate({f"core.{k}": v for k, v in original.state_dict().items()}, opts["head_dim"], Path("original"))
    ours.load_state_dict({k.removeprefix("encoder.core."): v for k, v in state.items()}, strict=True)
    return ours, original


def make_inputs(batch: int, frames: int, device: torch.device, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, 1, frames, 36, 64, generator=g)
    behavior, pupil = torch.randn(batch, 2, frames, generator=g), torch.randn(batch, 2, frames, generator=g)
    return video.to(device), behavior.to(device), pupil.to(device)


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[Any]:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def parity(orig_cls: type[nn.Module], opts: dict[str, Any], device: torch.device) -> dict[str, float]:
    """Largest |ours − original| (fp32) in eval and train mode, for the fused and the literal tokenizer.

    Train mode runs without DropPath: ours draws its masks with ``bernoulli_(float)``, the original with
    ``bernoulli_(tensor)`` — the same distribution from a different random stream. Dropout masks do match.
    """
    video, behavior, pupil = make_inputs(2, 30, device)
    result: dict[str, float] = {}
    for fused in (True, False):
        for mode in ("eval", "train"):
            ours, original = build_pair(
                orig_cls, {**opts, "drop_path": 0.0} if mode == "train" else opts, 30, device, False, fused
            )
            ours.train(mode == "train")
            original.train(mode == "train")
            with torch.no_grad():
                torch.manual_seed(1)
                a = ours(video, behavior, pupil)
                torch.manual_seed(1)
                b = original(video, mouse_id="mouse", behaviors=behavior, pupil_centers=pupil)
            result[f"{'fused' if fused else 'unfold'}_{mode}"] = (a - b).abs().max().item()
        result["output_scale"] = b.abs().max().item()
    return result


def throughput(
    orig_cls: type[nn.Module],
    opts: dict[str, Any],
    batch: int,
    frames: int,
    iters: int,
    device: torch.device,
    bf16: bool,
) -> dict[str, list[float]]:
    video, behavior, pupil = make_inputs(batch, frames, device)
    fused, original = build_pair(orig_cls, opts, frames, device, bf16, fused=True)
    unfold, _ = build_pair(orig_cls, opts, frames, device, bf16, fused=False)
    for m in (fused, unfold, original):
        m.train()

    def ours(model: ViViTCore) -> Callable[[], Tensor]:
        def run() -> Tensor:
            with autocast(device, bf16):
                return model(video, behavior, pupil).float().square().sum()

        return run

    runs: dict[str, tuple[Callable[[], Tensor], list[nn.Parameter]]] = {
        "ours (fused tokenizer)": (ours(fused), list(fused.parameters())),
        "ours (unfold tokenizer)": (ours(unfold), list(unfold.parameters())),
        # The original enters its own bf16 autocast (args.precision) inside forward.
        "original": (
            lambda: original(video, mouse_id="mouse", behaviors=behavior, pupil_centers=pupil).float().square().sum(),
            list(original.parameters()),
        ),
    }
    return time_steps(runs, iters)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", default="/tmp/viv1t_orig", help="folder holding the exported `src/viv1t/`")
    parser.add_argument("--deps", default=None, help="extra sys.path folder with einops (pip install --target)")
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--frames", type=int, default=140)
    parser.add_argument("--iters", type=int, default=3, help="timed steps per model (0: parity check only)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for both (the original's --precision bf16)")
    parser.add_argument("--tiny", action="store_true", help="a small core (smoke test)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.deps:
        sys.path.insert(0, args.deps)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    opts = TINY if args.tiny else FULL
    orig_cls = import_original(args.original)

    print("parity (max |ours − original|, fp32; train mode without DropPath):")
    for name, value in {**parity(orig_cls, opts, device), **readout_parity(device)}.items():
        print(f"  {name}: {value:.3g}")
    if args.iters <= 0:
        return

    precision = "bf16 autocast" if args.bf16 else "fp32"
    print(f"throughput: batch {args.batch}, {args.frames} frames, {precision}, train mode, fwd+bwd")
    times = throughput(orig_cls, opts, args.batch, args.frames, args.iters, device, args.bf16)
    report("bench_vivit_forward.py", argv, args.batch, times)


if __name__ == "__main__":
    main()
