"""Dynamic-V1FM, ours vs the original: a parity check, then forward+backward throughput side by side.

The original is ``zhuyu-cs/Dynamic-VFM`` (``models/swin_core.py`` ``SwinCore``, ``models/readouts_{mean,adaptive}.py``
``FullGaussian2d``, ``models/shifters.py`` ``MLPShifter``) with the settings of ``config/neuroencoding.py``, wired as
``models/video_encoder.py`` ``VideoFiringRateEncoder.forward`` does. It is imported from an exported copy of the
repository, never installed; its one ``einops`` call pattern is stubbed when einops is missing. Export it once, from
any clone of https://github.com/zhuyu-cs/Dynamic-VFM::

    mkdir -p /tmp/dynvfm_orig && git -C <clone> archive HEAD models | tar -x -C /tmp/dynvfm_orig

Parity: the original's parameters are copied into ours, and both run on the same input in eval and in train mode
(Gaussian position sampling from the same seed, set between core and readout). Throughput: training mode, one
mouse, ``loss = Σ output``, one backward; the two models alternate iteration by iteration. The original readout
needs exactly 30 input frames (15 tokens) and ≥ 16 neurons.

    python benchmarks/bench_swin3d_forward.py [--batch 8] [--neurons 8000] [--iters 3] [--fusion mean]
    python benchmarks/bench_swin3d_forward.py --embed-dim 32 --heads 2 --mlp-hidden 16 --neurons 64 --iters 1  # smoke
"""

# The original modules are nn.Module trees reached by attribute: their types are dynamic.
# mypy: disable-error-code="union-attr,index,operator,attr-defined,call-overload,arg-type"

from __future__ import annotations

import argparse
import importlib
import re
import sys
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _report import report, time_steps
from torch import Tensor, nn

from lightning_sensorium.data.batch import NeuronInfo
from lightning_sensorium.models.cores.swin3d import Swin3dCore
from lightning_sensorium.models.encoder import Encoder
from lightning_sensorium.models.readouts.hierarchical_gaussian import HierarchicalGaussianReadout
from lightning_sensorium.models.shifters import MLPShifter
from lightning_sensorium.weights.dynamic_v1fm import translate

KEY = "mouse"
FRAMES = 30  # the original readout reshapes with a hard-coded 15 tokens


def _stub_einops() -> None:
    """``einops.rearrange`` for the two patterns ``swin_core.py`` uses, if einops is not installed."""
    try:
        importlib.import_module("einops")
    except ImportError:
        stub = types.ModuleType("einops")
        patterns = {"b t h w c -> b c t h w": (0, 4, 1, 2, 3), "b c t h w -> b t h w c": (0, 2, 3, 4, 1)}

        def rearrange(x: Tensor, pattern: str) -> Tensor:
            return x.permute(*patterns[" ".join(pattern.split())])

        stub.rearrange = rearrange
        sys.modules["einops"] = stub


def import_original(path: str, fusion: str) -> types.SimpleNamespace:
    """The original core, readout (mean or adaptive class) and shifter from an exported Dynamic-VFM tree."""
    _stub_einops()
    sys.path.insert(0, path)
    core = importlib.import_module("models.swin_core").SwinCore
    readout = importlib.import_module(f"models.readouts_{fusion}").FullGaussian2d
    shifter = importlib.import_module("models.shifters").MLPShifter
    return types.SimpleNamespace(core=core, readout=readout, shifter=shifter)


def build_original(orig: types.SimpleNamespace, neurons: NeuronInfo, args: argparse.Namespace) -> nn.Module:
    """Core, readout and shifter with ``config/neuroencoding.py``'s settings (sizes from ``args``)."""
    model = nn.Module()
    model.core = orig.core(
        in_channels=1,
        behavior_dim=4,
        patch_size=[2, 2, 2],
        window_size=list(args.window),
        emb_dim=args.embed_dim,
        num_blocks=args.blocks,
        num_heads=args.heads,
        mlp_dim=args.mlp_hidden,
        t_dropout=0.0,
        drop_path=0.0,
        bias=True,
        grad_checkpointing=False,
    )
    model.readout = orig.readout(
        in_shape=(args.embed_dim, 18, 32),
        outdims=neurons.num_neurons,
        bias=True,
        init_mu_range=0.3,
        init_sigma=0.2,
        gauss_type="full",
        grid_mean_predictor={"hidden_layers": 1, "hidden_features": 32, "final_tanh": True},
        source_grid=np.asarray(neurons.coordinates)[:, :2],
        mean_activity=torch.as_tensor(neurons.mean_responses, dtype=torch.float32),
        feature_reg_weight=0.0,
    )
    model.shifter = orig.shifter(data_keys=[KEY], input_channels=2, hidden_channels_shifter=16, shift_layers=3)
    return model


def original_forward(
    model: nn.Module, video: Tensor, behavior: Tensor, pupil_center: Tensor, mode: str, seed: int | None = None
) -> Tensor:
    """``VideoFiringRateEncoder.forward``; ``seed`` reseeds between core and readout (for the parity check)."""
    x = torch.transpose(model.core(video, behavior, pupil_center), 1, 2)  # (B, T', C, H', W')
    b, t = x.shape[:2]
    pupil = torch.transpose(pupil_center[:, :, -t:], 1, 2).reshape(-1, 2)  # (B·T', 2)
    shift = model.shifter[KEY](pupil, None)  # (B·T', 2)
    if seed is not None:
        torch.manual_seed(seed)
    x = model.readout(x.reshape((-1,) + x.size()[2:]), shift=shift, infer_mode=mode)  # (B·T', N)
    x = nn.functional.elu(x) + 1
    return x.reshape(b, t, -1).transpose(1, 2)  # (B, N, T'), ours' layout


def ours_forward(
    model: Encoder, video: Tensor, behavior: Tensor, pupil_center: Tensor, seed: int | None = None
) -> Tensor:
    features = model.core(video, behavior, pupil_center)  # (B, C, T', H', W')
    if seed is not None:
        torch.manual_seed(seed)
    return model.read(features, KEY, behavior, pupil_center)  # (B, N, T')


def copy_original_into(ours: Encoder, original: nn.Module) -> None:
    """Load the original's weights into ours by the importer's name mapping
    (:func:`lightning_sensorium.weights.dynamic_v1fm.translate`; strict: every entry matched, shapes checked)."""
    keyed = {re.sub(r"^readout\.", f"readout.{KEY}.", k): v for k, v in original.state_dict().items()}  # one mouse
    state = translate(keyed, Path("original"))
    ours.load_state_dict({k.removeprefix("encoder."): v for k, v in state.items()}, strict=True)


def make_case(batch: int, n: int, seed: int = 0) -> tuple[NeuronInfo, tuple[Tensor, Tensor, Tensor]]:
    rng = np.random.default_rng(seed)
    neurons = NeuronInfo(KEY, np.arange(n), rng.uniform(0, 600, (n, 3)), rng.uniform(0.2, 2.0, n).astype(np.float32))
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, 1, FRAMES, 36, 64, generator=g)
    return neurons, (video, torch.randn(batch, 2, FRAMES, generator=g), torch.randn(batch, 2, FRAMES, generator=g))


def build_pair(orig: types.SimpleNamespace, neurons: NeuronInfo, args: argparse.Namespace) -> tuple[Encoder, nn.Module]:
    torch.manual_seed(0)
    core = Swin3dCore(
        embed_dim=args.embed_dim,
        num_blocks=args.blocks,
        num_heads=args.heads,
        window_size=tuple(args.window),
        mlp_hidden=args.mlp_hidden,
    )

    def readout(in_shape: tuple[int, int, int], info: NeuronInfo) -> HierarchicalGaussianReadout:
        return HierarchicalGaussianReadout(in_shape, info, levels=tuple(args.levels), fusion=args.fusion)

    ours = Encoder.build(core, readout, {KEY: neurons}, lambda: MLPShifter(hidden_channels=16), frames=FRAMES)
    original = build_original(orig, neurons, args)
    copy_original_into(ours, original)
    return ours, original


def mode_string(levels: list[int]) -> str:
    return "_".join(str(k) for k in levels) if levels else "0"


def parity(orig: types.SimpleNamespace, args: argparse.Namespace) -> dict[str, float]:
    """Largest |ours − original| after copying the original's weights, in eval and train mode."""
    neurons, (video, behavior, pupil) = make_case(batch=2, n=args.neurons)
    ours, original = build_pair(orig, neurons, args)
    result = {
        "parameters": float(sum(p.numel() for p in ours.parameters()) - sum(p.numel() for p in original.parameters()))
    }
    with torch.no_grad():
        ours.eval(), original.eval()
        a = ours.core(video, behavior, pupil)
        b = original.core(video, behavior, pupil)
        result["core_eval"] = (a - b).abs().max().item()
        result["core_scale"] = b.abs().max().item()
        for mode in ("eval", "train"):
            ours.train(mode == "train")
            original.train(mode == "train")
            a = ours_forward(ours, video, behavior, pupil, seed=1)
            b = original_forward(original, video, behavior, pupil, mode_string(args.levels), seed=1)
            result[f"output_{mode}"] = (a - b).abs().max().item()
    result["output_scale"] = b.abs().max().item()
    return result


def throughput(orig: types.SimpleNamespace, args: argparse.Namespace) -> dict[str, list[float]]:
    neurons, inputs = make_case(args.batch, args.neurons)
    ours, original = build_pair(orig, neurons, args)
    device = torch.device(args.device)
    ours.to(device).train()
    original.to(device).train()
    video, behavior, pupil = (x.to(device) for x in inputs)
    mode = mode_string(args.levels)
    runs: dict[str, tuple[Callable[[], Tensor], list[nn.Parameter]]] = {
        "ours": (lambda: ours_forward(ours, video, behavior, pupil).sum(), list(ours.parameters())),
        "original": (
            lambda: original_forward(original, video, behavior, pupil, mode).sum(),
            list(original.parameters()),
        ),
    }
    return time_steps(runs, args.iters)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", default="/tmp/dynvfm_orig", help="folder holding the exported `models/`")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--neurons", type=int, default=8000)
    parser.add_argument("--embed-dim", type=int, default=224)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--mlp-hidden", type=int, default=488)
    parser.add_argument("--window", type=int, nargs=3, default=[8, 7, 7])
    parser.add_argument("--levels", type=int, nargs="*", default=[2, 4, 8, 16], help="fused levels (none: base only)")
    parser.add_argument("--fusion", choices=["mean", "adaptive"], default="mean")
    parser.add_argument("--iters", type=int, default=3, help="timed steps per model (0: parity check only)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    orig = import_original(args.original, args.fusion)

    print(f"parity (max |ours − original|), fusion {args.fusion}, levels {mode_string(args.levels)}:")
    for name, value in parity(orig, args).items():
        print(f"  {name}: {value:.3g}")
    if args.iters <= 0:
        return

    print(
        f"throughput: batch {args.batch}, {FRAMES} frames, {args.neurons} neurons, train mode, fwd+bwd, {args.device}"
    )
    times = throughput(orig, args)
    report("bench_swin3d_forward.py", argv, args.batch, times)


if __name__ == "__main__":
    main()
