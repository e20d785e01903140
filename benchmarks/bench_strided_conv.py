"""The factorized core's strided first layer: oneDNN's strided ``conv3d`` against :func:`strided_spatial_conv`.

The demo's factorized core convolves the 1-channel video with an 11 × 11 kernel at spatial stride 2
(``input_stride: 2``). ``strided_spatial_conv`` computes the same sum as a stride-1 convolution of the
space-to-depth rearranged video. This checks that outputs and weight gradients agree, then times forward + backward
of that layer alone (the video needs no gradient), the two alternating step by step (:func:`_report.time_steps`),
at the demo's batch (8 windows × 40 frames of 36 × 64) and for a 17 × 17 kernel.

    python benchmarks/bench_strided_conv.py [--iters 10] [--batch 8] [--frames 40]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import report, time_steps  # noqa: E402

from lightning_sensorium.models.layers import strided_spatial_conv  # noqa: E402


def compare(batch: int, frames: int, kernel: int, channels: int, iters: int, argv: list[str] | None) -> None:
    """Check agreement, then time both computations of one first layer and print the report."""
    video = torch.randn(batch, 1, frames, 36, 64)  # (B, 1, T, H, W)
    weight = (torch.randn(channels, 1, 1, kernel, kernel) / kernel).requires_grad_()
    bias = torch.zeros(channels, requires_grad=True)
    probe = torch.randn(batch, channels, frames, 18, 32)  # a fixed upstream gradient
    params = [weight, bias]

    def original() -> torch.Tensor:
        return (F.conv3d(video, weight, bias, (1, 2, 2), (0, kernel // 2, kernel // 2)) * probe).sum()

    def ours() -> torch.Tensor:
        return (strided_spatial_conv(video, weight, bias, 2, kernel // 2) * probe).sum()

    a, b = original(), ours()
    (ga,), (gb,) = torch.autograd.grad(a, [weight]), torch.autograd.grad(b, [weight])
    print(
        f"\n{kernel} × {kernel}, {channels} channels: |Δ| value {abs(a - b).item():.1e} of {abs(a).item():.1e}; "
        f"|Δ| weight gradient {(ga - gb).abs().max().item():.1e} of {ga.abs().max().item():.1e}"
    )
    times = time_steps({"original": (original, params), "space-to-depth": (ours, params)}, iters)
    report("bench_strided_conv.py", argv, batch, times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--frames", type=int, default=40)
    ns = parser.parse_args(argv)
    torch.manual_seed(0)
    for kernel in (11, 17):
        compare(ns.batch, ns.frames, kernel, 8, ns.iters, argv)


if __name__ == "__main__":
    main()
