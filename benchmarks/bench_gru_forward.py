"""GRU baseline, ours vs the original: a parity check, then forward+backward throughput side by side.

The original is the neuralpredictors code the SENSORIUM 2023 starter kit builds (``RotationEquivariant2dCore``,
``GRU_Module``, ``FullGaussian2d`` in a ``MultiReadoutSharedParametersBase``, ``MLPShifter``) with the benchmark
notebook's settings, wired as ``VideoFiringRateEncoder.forward`` does for a 2D core with a GRU. It is imported from
an exported copy of the repository, never installed; its ``torchvision`` import (unused by these modules) is stubbed
and ``scipy.special.gamma`` (the Hermite coefficients, integer arguments only) is replaced by ``math.gamma``. Export
it once, from any clone of https://github.com/sinzlab/neuralpredictors::

    mkdir -p /tmp/np_orig && git -C <clone> archive HEAD neuralpredictors | tar -x -C /tmp/np_orig

Parity: the original's parameters are copied into ours, and both run on the same input, first in train mode
(BatchNorm batch statistics, which also set the running statistics of both; Gaussian positions sampled from the same
seed), then in eval mode; the gradients of ``Σ output + regularizer`` are compared too. Throughput: training mode,
one mouse, ``loss = Σ output + regularizer``, one backward; the two models alternate iteration by iteration.

    python benchmarks/bench_gru_forward.py [--batch 8] [--frames 80] [--neurons 8000] [--iters 3] [--device cuda]
"""

# The original modules are nn.Module trees reached by attribute: their types are dynamic.
# mypy: disable-error-code="union-attr,index,operator,attr-defined,call-overload"

from __future__ import annotations

import argparse
import math
import sys
import types
import warnings
from collections.abc import Callable

import numpy as np
import torch
from _baseline_head import KEY, add_original_head, original_read
from _report import report, time_steps
from torch import Tensor, nn

from lightning_sensorium.data.batch import NeuronInfo
from lightning_sensorium.models import Encoder, GaussianReadout, MLPShifter
from lightning_sensorium.models.cores.cnn_gru import CnnGruCore
from lightning_sensorium.weights.starter_kit import gru_key


def import_original(path: str) -> types.SimpleNamespace:
    """The original modules from an exported neuralpredictors tree, with ``torchvision`` and ``scipy`` stubbed."""
    sys.path.insert(0, path)
    warnings.filterwarnings("ignore", module=r"neuralpredictors\.")  # deprecated init calls, list indexing
    for name in ("torchvision", "scipy", "scipy.special"):
        sys.modules.setdefault(name, types.ModuleType(name))
    if not hasattr(sys.modules["scipy.special"], "gamma"):  # a stub, not a real scipy
        sys.modules["scipy.special"].gamma = np.vectorize(math.gamma, otypes=[np.float64])
    from neuralpredictors.layers.cores.conv2d import RotationEquivariant2dCore
    from neuralpredictors.layers.readouts import FullGaussian2d, MultiReadoutSharedParametersBase
    from neuralpredictors.layers.rnn_modules.gru_module import GRU_Module
    from neuralpredictors.layers.shifters import MLPShifter as OrigShifter

    class MultipleFullGaussian2d(MultiReadoutSharedParametersBase):  # sensorium/models/readouts.py
        _base_readout = FullGaussian2d

    return types.SimpleNamespace(
        core=RotationEquivariant2dCore, gru=GRU_Module, readout=MultipleFullGaussian2d, shifter=OrigShifter
    )


def build_original(orig: types.SimpleNamespace, neurons: NeuronInfo) -> nn.Module:
    """Core, GRU, readout and shifter with the benchmark notebook's settings (``make_video_model``'s order)."""
    model = nn.Module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated xavier_normal / init.constant, "applied to all layers"
        model.core = orig.core(
            input_channels=3,
            hidden_channels=8,
            input_kern=9,
            hidden_kern=7,
            layers=4,
            num_rotations=8,
            gamma_input=500,
            skip=0,
            pad_input=False,
            final_nonlinearity=False,
            bias=True,
            momentum=0.9,
            batch_norm=True,
            hidden_dilation=1,
            laplace_padding=None,
            input_regularizer="LaplaceL2norm",
            stack=-1,
            depth_separable=False,
            linear=False,
            attention_conv=False,
            hidden_padding=None,
            use_avg_reg=False,
            final_batchnorm_scale=True,
            gamma_hidden=500_000,
        )
        add_original_head(model, orig, neurons, (64, 28, 56))
        # VideoFiringRateEncoder's attribute name: the state dict keys are the starter kit's (gru_module.gru.*).
        model.gru_module = orig.gru(input_channels=64, rec_channels=64, input_kern=9, rec_kern=9, gamma_rec=0)
    return model


def original_forward(model: nn.Module, video: Tensor, behavior: Tensor, pupil_center: Tensor) -> Tensor:
    """``VideoFiringRateEncoder.forward`` for a 2D core with a GRU; the loader's behaviour channels added first.

    https://github.com/ecker-lab/sensorium_2023/blob/main/sensorium/models/video_encoder.py
    """
    b, _, t, h, w = video.shape
    x = torch.cat([video, behavior[..., None, None].expand(b, 2, t, h, w)], dim=1)  # AddBehaviorAsChannels
    x = torch.transpose(x, 1, 2)  # (B, T, C, H, W)
    x = x.reshape((-1,) + x.size()[2:])  # (B·T, C, H, W)
    x = model.core(x)  # (B·T, 64, H', W')
    x = x.reshape((b, -1) + x.size()[1:])  # (B, T, 64, H', W')
    x = torch.transpose(x, 1, 2)  # (B, 64, T, H', W')
    x = model.gru_module(x)  # (B, 64, T, H', W')
    x = torch.transpose(x, 1, 2)  # (B, T, 64, H', W')
    return original_read(model, x, pupil_center)  # (B, N, T')


def original_regularizer(model: nn.Module) -> Tensor:
    # video_training_loop.full_objective: the core's + the readout's (the GRU's gamma_rec never enters the loss).
    return model.core.regularizer() + model.readout.regularizer(KEY)


def our_name(original_name: str) -> str | None:
    """The name in ours of an original parameter or buffer, or None for the original's constants (the importer's
    mapping: lightning_sensorium.weights.starter_kit)."""
    return gru_key(original_name)


def copy_original_into(ours: Encoder, original: nn.Module) -> None:
    """Load the original's parameters and buffers into ours (names mapped, shapes checked by load_state_dict)."""
    state = {name: v for k, v in original.state_dict().items() if (name := our_name(k)) is not None}
    ours.load_state_dict(state, strict=True)


def make_case(batch: int, frames: int, n: int, seed: int = 0) -> tuple[NeuronInfo, tuple[Tensor, Tensor, Tensor]]:
    rng = np.random.default_rng(seed)
    neurons = NeuronInfo(KEY, np.arange(n), rng.uniform(0, 600, (n, 3)), rng.uniform(0.2, 2.0, n).astype(np.float32))
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, 1, frames, 36, 64, generator=g)
    behavior = torch.randn(batch, 2, frames, generator=g)
    pupil = torch.randn(batch, 2, frames, generator=g)
    return neurons, (video, behavior, pupil)


def build_pair(orig: types.SimpleNamespace, neurons: NeuronInfo, device: torch.device) -> tuple[Encoder, nn.Module]:
    torch.manual_seed(0)
    ours = Encoder.build(CnnGruCore(), GaussianReadout, {KEY: neurons}, MLPShifter)
    original = build_original(orig, neurons)
    copy_original_into(ours, original)
    return ours.to(device), original.to(device)


def parity(orig: types.SimpleNamespace, batch: int, frames: int, device: torch.device) -> dict[str, float]:
    """Largest |ours − original| on a small case, after copying the original's weights."""
    neurons, inputs = make_case(batch=batch, frames=frames, n=300)
    video, behavior, pupil = (x.to(device) for x in inputs)
    ours, original = build_pair(orig, neurons, device)
    result = {
        "source_grid": (ours.readouts[KEY].source_grid - original.readout[KEY].source_grid).abs().max().item(),
        "regularizer_rel": abs(ours.regularizer(KEY).item() / original_regularizer(original).item() - 1),
    }
    for mode in ("train", "eval"):  # train first: it sets the BatchNorm running statistics of both alike
        ours.train(mode == "train")
        original.train(mode == "train")
        torch.manual_seed(1)
        a = ours(video, KEY, behavior, pupil)
        torch.manual_seed(1)
        b = original_forward(original, video, behavior, pupil)
        result[f"output_{mode}"] = (a - b).abs().max().item()
        if mode == "train":
            (a.sum() + ours.regularizer(KEY)).backward()
            (b.sum() + original_regularizer(original)).backward()
            ours_params = dict(ours.named_parameters())
            worst = 0.0
            for name, p in original.named_parameters():
                mapped = our_name(name)
                if mapped is None or p.grad is None:
                    continue
                q = ours_params[mapped].grad
                assert q is not None, f"no gradient for {mapped}"
                worst = max(worst, ((q - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-12)).item())
            result["grad_rel_max"] = worst
    result["output_scale"] = b.abs().max().item()
    return result


def throughput(
    orig: types.SimpleNamespace, batch: int, frames: int, n: int, iters: int, device: torch.device
) -> dict[str, list[float]]:
    neurons, inputs = make_case(batch, frames, n)
    video, behavior, pupil = (x.to(device) for x in inputs)
    ours, original = build_pair(orig, neurons, device)
    ours.train()
    original.train()
    runs: dict[str, tuple[Callable[[], Tensor], list[nn.Parameter]]] = {
        "ours": (lambda: ours(video, KEY, behavior, pupil).sum() + ours.regularizer(KEY), list(ours.parameters())),
        "original": (
            lambda: original_forward(original, video, behavior, pupil).sum() + original_regularizer(original),
            list(original.parameters()),
        ),
    }
    times = time_steps(runs, iters)
    if device.type == "cuda":
        print(f"  peak GPU memory (both models): {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", default="/tmp/np_orig", help="folder holding the exported `neuralpredictors/`")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--frames", type=int, default=80)
    parser.add_argument("--neurons", type=int, default=8000)
    parser.add_argument("--iters", type=int, default=3, help="timed steps per model (0: parity check only)")
    parser.add_argument("--parity-batch", type=int, default=2)
    parser.add_argument("--parity-frames", type=int, default=6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    orig = import_original(args.original)

    print(f"parity on {device} (max |ours − original|):")
    for name, value in parity(orig, args.parity_batch, args.parity_frames, device).items():
        print(f"  {name}: {value:.3g}")
    if args.iters <= 0:
        return

    print(f"throughput: batch {args.batch}, {args.frames} frames, {args.neurons} neurons, train mode, fwd+bwd")
    times = throughput(orig, args.batch, args.frames, args.neurons, args.iters, device)
    report("bench_gru_forward.py", argv, args.batch, times)


if __name__ == "__main__":
    main()
