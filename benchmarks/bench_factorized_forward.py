"""Factorized baseline, ours vs the original: a parity check, then forward+backward throughput side by side.

The original is the neuralpredictors code the SENSORIUM 2023 starter kit builds (``Factorized3dCore``,
``FullGaussian2d`` in a ``MultiReadoutSharedParametersBase``, ``MLPShifter``) with the benchmark notebook's
settings, wired as ``VideoFiringRateEncoder.forward`` does for a 3D core. It is imported from an exported copy of
the repository, never installed; its ``torchvision`` and ``scipy.special`` imports (used only by 2D cores and Hermite
filters) are stubbed. Export it once, from any clone of https://github.com/sinzlab/neuralpredictors::

    mkdir -p /tmp/np_orig && git -C <clone> archive HEAD neuralpredictors | tar -x -C /tmp/np_orig

Parity: the original's parameters are copied into ours, and both run on the same input, in eval and in train mode
(BatchNorm batch statistics, Gaussian position sampling from the same seed). Throughput: training mode, one mouse,
``loss = Σ output + regularizer``, one backward; the two models alternate iteration by iteration.

    python benchmarks/bench_factorized_forward.py [--batch 8] [--frames 80] [--neurons 8000] [--iters 3]
"""

# The original modules are nn.Module trees reached by attribute: their types are dynamic.
# mypy: disable-error-code="union-attr,index,operator,attr-defined,call-overload"

from __future__ import annotations

import argparse
import sys
import types
from collections.abc import Callable

import numpy as np
import torch
from _baseline_head import KEY, add_original_head, original_read
from _report import report, time_steps
from torch import Tensor, nn

from lightning_sensorium.data.batch import NeuronInfo
from lightning_sensorium.models import Encoder, Factorized3dCore, GaussianReadout, MLPShifter
from lightning_sensorium.weights.starter_kit import factorized_key


def import_original(path: str) -> types.SimpleNamespace:
    """The original modules from an exported neuralpredictors tree, with its 2D-only imports stubbed."""
    sys.path.insert(0, path)
    for name in ("torchvision", "scipy", "scipy.special"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["scipy.special"].gamma = None  # used by Hermite filters only
    from neuralpredictors.layers.cores.conv3d import Factorized3dCore as OrigCore
    from neuralpredictors.layers.readouts import FullGaussian2d, MultiReadoutSharedParametersBase
    from neuralpredictors.layers.shifters import MLPShifter as OrigShifter

    class MultipleFullGaussian2d(MultiReadoutSharedParametersBase):  # sensorium/models/readouts.py
        _base_readout = FullGaussian2d

    return types.SimpleNamespace(core=OrigCore, readout=MultipleFullGaussian2d, shifter=OrigShifter)


def build_original(orig: types.SimpleNamespace, neurons: NeuronInfo, in_shape: tuple[int, int, int]) -> nn.Module:
    """Core, readout and shifter with the benchmark notebook's settings."""
    model = nn.Module()
    model.core = orig.core(
        input_channels=3,
        hidden_channels=[32, 64, 128],
        spatial_input_kernel=(11, 11),
        temporal_input_kernel=11,
        spatial_hidden_kernel=(5, 5),
        temporal_hidden_kernel=5,
        stride=1,
        layers=3,
        gamma_input_spatial=10,
        gamma_input_temporal=0.01,
        bias=True,
        hidden_nonlinearities="elu",
        x_shift=0,
        y_shift=0,
        batch_norm=True,
        laplace_padding=None,
        input_regularizer="LaplaceL2norm",
        padding=False,
        final_nonlin=True,
        momentum=0.7,
    )
    add_original_head(model, orig, neurons, in_shape)
    return model


def original_forward(model: nn.Module, video: Tensor, behavior: Tensor, pupil_center: Tensor) -> Tensor:
    """``VideoFiringRateEncoder.forward`` for a 3D core, no GRU; the loader's behaviour channels added first.

    https://github.com/ecker-lab/sensorium_2023/blob/main/sensorium/models/video_encoder.py
    """
    b, _, t, h, w = video.shape
    x = torch.cat([video, behavior[..., None, None].expand(b, 2, t, h, w)], dim=1)  # AddBehaviorAsChannels
    x = model.core(x)  # (B, C, T', H', W')
    x = torch.transpose(x, 1, 2)  # (B, T', C, H', W')
    return original_read(model, x, pupil_center)  # (B, N, T')


def original_regularizer(model: nn.Module) -> Tensor:
    # video_training_loop.full_objective: sum of the core's (spatial, temporal) tuple + the readout's.
    return sum(model.core.regularizer()) + model.readout.regularizer(KEY)


def copy_original_into(ours: Encoder, original: nn.Module) -> None:
    """Load the original's parameters and buffers into ours (names mapped by the importer's mapping,
    lightning_sensorium.weights.starter_kit; shapes checked by load_state_dict)."""
    state = {name: v for k, v in original.state_dict().items() if (name := factorized_key(k)) is not None}
    ours.load_state_dict(state, strict=True)


def make_case(
    batch: int, frames: int, n: int, seed: int = 0
) -> tuple[NeuronInfo, tuple[Tensor, Tensor, Tensor], Tensor]:
    rng = np.random.default_rng(seed)
    neurons = NeuronInfo(KEY, np.arange(n), rng.uniform(0, 600, (n, 3)), rng.uniform(0.2, 2.0, n).astype(np.float32))
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, 1, frames, 36, 64, generator=g)
    behavior = torch.randn(batch, 2, frames, generator=g)
    pupil = torch.randn(batch, 2, frames, generator=g)
    return neurons, (video, behavior, pupil), torch.rand(batch, n, frames - 18, generator=g)


def build_pair(orig: types.SimpleNamespace, neurons: NeuronInfo) -> tuple[Encoder, nn.Module]:
    torch.manual_seed(0)
    ours = Encoder.build(Factorized3dCore(), GaussianReadout, {KEY: neurons}, MLPShifter)
    original = build_original(orig, neurons, (128, 18, 46))
    copy_original_into(ours, original)
    return ours, original


def parity(orig: types.SimpleNamespace) -> dict[str, float]:
    """Largest |ours − original| on a small case, in eval and train mode, after copying the original's weights."""
    neurons, (video, behavior, pupil), _ = make_case(batch=2, frames=30, n=300)
    ours, original = build_pair(orig, neurons)
    result = {
        "source_grid": (ours.readouts[KEY].source_grid - original.readout[KEY].source_grid).abs().max().item(),
        "regularizer": abs(ours.regularizer(KEY).item() - original_regularizer(original).item()),
    }
    for mode in ("eval", "train"):
        ours.train(mode == "train")
        original.train(mode == "train")
        with torch.no_grad():
            torch.manual_seed(1)
            a = ours(video, KEY, behavior, pupil)
            torch.manual_seed(1)
            b = original_forward(original, video, behavior, pupil)
        result[f"output_{mode}"] = (a - b).abs().max().item()
    result["output_scale"] = b.abs().max().item()
    return result


def throughput(orig: types.SimpleNamespace, batch: int, frames: int, n: int, iters: int) -> dict[str, list[float]]:
    neurons, (video, behavior, pupil), _ = make_case(batch, frames, n)
    ours, original = build_pair(orig, neurons)
    ours.train()
    original.train()
    runs: dict[str, tuple[Callable[[], Tensor], list[nn.Parameter]]] = {
        "ours": (lambda: ours(video, KEY, behavior, pupil).sum() + ours.regularizer(KEY), list(ours.parameters())),
        "original": (
            lambda: original_forward(original, video, behavior, pupil).sum() + original_regularizer(original),
            list(original.parameters()),
        ),
    }
    return time_steps(runs, iters)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", default="/tmp/np_orig", help="folder holding the exported `neuralpredictors/`")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--frames", type=int, default=80)
    parser.add_argument("--neurons", type=int, default=8000)
    parser.add_argument("--iters", type=int, default=3, help="timed steps per model (0: parity check only)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    orig = import_original(args.original)

    print("parity (max |ours − original|):")
    for name, value in parity(orig).items():
        print(f"  {name}: {value:.3g}")
    if args.iters <= 0:
        return

    print(f"throughput: batch {args.batch}, {args.frames} frames, {args.neurons} neurons, train mode, fwd+bwd")
    times = throughput(orig, args.batch, args.frames, args.neurons, args.iters)
    report("bench_factorized_forward.py", argv, args.batch, times)


if __name__ == "__main__":
    main()
