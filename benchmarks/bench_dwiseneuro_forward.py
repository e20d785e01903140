"""DwiseNeuro, ours vs the original: a parity check, then forward+backward throughput side by side.

The original is ``src/models/dwiseneuro.py`` (``DwiseNeuro``) and ``src/inputs.py`` (``StackInputsProcessor``) of
https://github.com/lRomul/sensorium, imported from an exported copy of the repository, never installed (both files
import only torch and numpy: nothing is stubbed). Export them once, from any clone::

    mkdir -p /tmp/dwiseneuro_orig && git -C <clone> archive HEAD src/models/dwiseneuro.py src/inputs.py \
        | tar -x -C /tmp/dwiseneuro_orig

Parity: the original's parameters are copied into ours (names mapped by
:func:`~lightning_sensorium.models.cores.dwiseneuro.original_key`); the original's input tensor is built by its
``StackInputsProcessor`` per sample, ours inside the core; both run on the same raw input in eval and in train mode
(BatchNorm batch statistics; DropPath and Dropout1d from the same seed). Throughput: training mode, one mouse's
readout, ``loss = Σ output``, one backward; the two models alternate iteration by iteration.

    python benchmarks/bench_dwiseneuro_forward.py [--batch 32] [--frames 16] [--neurons 7863] [--iters 3]
    python benchmarks/bench_dwiseneuro_forward.py --features 8,8,16 --strides 2,1,2 --expansion 2 \
        --se-reduction 4 --cortex 16,32 --batch 2 --frames 4 --neurons 50 --iters 1          # smoke
"""

# The original modules are nn.Module trees reached by attribute: their types are dynamic.
# mypy: disable-error-code="union-attr,index,operator,attr-defined,call-overload"

from __future__ import annotations

import argparse
import importlib.util
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _report import report, time_steps
from torch import Tensor, nn

from lightning_sensorium.data.batch import NeuronInfo
from lightning_sensorium.models.cores.dwiseneuro import DwiseNeuroCore, original_key
from lightning_sensorium.models.encoder import Encoder
from lightning_sensorium.models.readouts.dwiseneuro import DwiseNeuroReadout

KEY = "mouse"
BETA = 0.07  # softplus_beta of configs/true_batch_001.py


def import_original(path: str) -> types.SimpleNamespace:
    """``DwiseNeuro`` and ``StackInputsProcessor`` from the exported tree, loaded by file path."""

    def load(name: str, rel: str) -> types.ModuleType:
        file = Path(path) / rel
        if not file.is_file():
            raise FileNotFoundError(f"--original {path}: no {rel}; export it as the module docstring says")
        spec = importlib.util.spec_from_file_location(name, file)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    model = load("dwiseneuro_original", "src/models/dwiseneuro.py")
    inputs = load("dwiseneuro_original_inputs", "src/inputs.py")
    return types.SimpleNamespace(model=model.DwiseNeuro, inputs=inputs.StackInputsProcessor)


def build_pair(orig: types.SimpleNamespace, cfg: argparse.Namespace, n: int) -> tuple[Encoder, nn.Module]:
    """Ours and the original with the same settings, the original's weights copied into ours."""
    torch.manual_seed(0)
    original = orig.model(
        readout_outputs=(n,),
        in_channels=5,
        core_features=cfg.features,
        spatial_strides=cfg.strides,
        spatial_kernel=3,
        temporal_kernel=5,
        expansion_ratio=cfg.expansion,
        se_reduce_ratio=cfg.se_reduction,
        cortex_features=cfg.cortex,
        groups=2,
        softplus_beta=BETA,
        drop_rate=0.4,
        drop_path_rate=0.1,
    )
    core = DwiseNeuroCore(
        features=cfg.features,
        spatial_strides=cfg.strides,
        expansion=cfg.expansion,
        se_reduction=cfg.se_reduction,
        cortex_features=cfg.cortex,
    )
    neurons = NeuronInfo(KEY, np.arange(n), np.zeros((n, 3)), np.zeros(n))
    ours = Encoder.build(core, DwiseNeuroReadout, {KEY: neurons}, output_activation=nn.Softplus(beta=BETA))
    state = original.state_dict()
    core.load_state_dict({k: state[original_key(k)] for k in core.state_dict()})
    ours.readouts[KEY].conv.load_state_dict(original.readouts[0].layer[1].state_dict())
    return ours, original


def make_case(batch: int, frames: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    video = torch.rand(batch, 1, frames, 36, 64, generator=g) * 255  # raw grey levels, as the recipe trains
    return video, torch.randn(batch, 2, frames, generator=g), torch.randn(batch, 2, frames, generator=g)


def original_inputs(orig: types.SimpleNamespace, video: Tensor, behavior: Tensor, pupil: Tensor) -> Tensor:
    """The original's ``(B, 5, T, 64, 64)`` tensor, one ``StackInputsProcessor`` call per sample (frames last)."""
    proc = orig.inputs(size=(64, 64), pad_fill_value=0.0)
    frames = video[:, 0].permute(0, 2, 3, 1).numpy()  # (B, H, W, T): the release's layout
    return torch.stack([proc(frames[i], behavior[i].numpy(), pupil[i].numpy()) for i in range(video.shape[0])])


def parity(orig: types.SimpleNamespace, cfg: argparse.Namespace) -> dict[str, float]:
    """Largest |ours − original| on a small case, in eval and train mode."""
    ours, original = build_pair(orig, cfg, n=31)
    video, behavior, pupil = make_case(batch=2, frames=6)
    x = original_inputs(orig, video, behavior, pupil)
    n_ours, n_orig = (sum(p.numel() for p in m.parameters()) for m in (ours, original))
    result = {"parameters": float(n_ours - n_orig)}
    result["inputs"] = (ours.core.inputs(video, behavior, pupil) - x).abs().max().item()
    for mode in ("eval", "train"):
        ours.train(mode == "train")
        original.train(mode == "train")
        with torch.no_grad():
            torch.manual_seed(1)
            a = ours(video, KEY, behavior, pupil)
            torch.manual_seed(1)
            b = original(x, 0)
        result[f"output_{mode}"] = (a - b).abs().max().item()
        result[f"output_scale_{mode}"] = b.abs().max().item()
    return result


def throughput(orig: types.SimpleNamespace, cfg: argparse.Namespace) -> dict[str, list[float]]:
    ours, original = build_pair(orig, cfg, cfg.neurons)
    ours.train()
    original.train()
    video, behavior, pupil = make_case(cfg.batch, cfg.frames)
    # The original's loader builds its input on the CPU workers: outside the timed step, as there.
    x = original_inputs(orig, video, behavior, pupil)
    runs: dict[str, tuple[Callable[[], Tensor], list[nn.Parameter]]] = {
        "ours": (lambda: ours(video, KEY, behavior, pupil).sum(), list(ours.parameters())),
        "original": (lambda: original(x, 0).sum(), list(original.parameters())),
    }
    return time_steps(runs, cfg.iters)


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", default="/tmp/dwiseneuro_orig", help="folder holding the exported `src/`")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--neurons", type=int, default=7863)
    parser.add_argument("--features", type=ints, default=(64, 64, 64, 64, 128, 128, 128, 256, 256))
    parser.add_argument("--strides", type=ints, default=(2, 1, 1, 1, 2, 1, 1, 2, 1))
    parser.add_argument("--expansion", type=int, default=7)
    parser.add_argument("--se-reduction", dest="se_reduction", type=int, default=32)
    parser.add_argument("--cortex", type=ints, default=(1024, 2048, 4096))
    parser.add_argument("--iters", type=int, default=3, help="timed steps per model (0: parity check only)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    orig = import_original(args.original)

    print("parity (max |ours − original|):")
    for name, value in parity(orig, args).items():
        print(f"  {name}: {value:.3g}")
    if args.iters <= 0:
        return

    print(f"throughput: batch {args.batch}, {args.frames} frames, {args.neurons} neurons, train mode, fwd+bwd")
    times = throughput(orig, args)
    report("bench_dwiseneuro_forward.py", argv, args.batch, times)


if __name__ == "__main__":
    main()
