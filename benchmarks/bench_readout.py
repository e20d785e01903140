"""Gaussian-readout point reads: the original's strided grid against the contiguous grid our readouts pass.

Every Gaussian readout (factorized and GRU baselines, ViV1T, Dynamic-V1FM's hierarchical readout) reads each
neuron's features at one sampled point per (batch · frame) row with ``F.grid_sample``. The original builds the
grid as ``einsum("ancd,bnid->bnic", σ, z) + μ`` (neuralpredictors' ``FullGaussian2d.sample_grid``), whose result
is strided with the rows innermost; on CPU ``grid_sample`` then takes a much slower path. Our readouts make the
grid contiguous first. This times forward + backward of the read alone, the two alternating step by step
(:func:`_report.time_steps`), at the factorized baseline's faithful size (batch 8 × 62 output frames,
128 × 18 × 46 features, 8,000 neurons) and at the demo's (16 channels, 1,000 neurons), after checking that
values and gradients agree.

    python benchmarks/bench_readout.py [--iters 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import report, time_steps  # noqa: E402


def compare(rows: int, channels: int, neurons: int, iters: int, argv: list[str] | None) -> None:
    """Check agreement, then time both reads at one size and print the report."""
    features = torch.randn(rows, channels, 18, 46, requires_grad=True)  # (B·T, C, H, W)
    sigma = (torch.rand(1, neurons, 2, 2) * 0.2 - 0.1).requires_grad_()  # (1, N, 2, 2)
    mu = (torch.rand(1, neurons, 1, 2) * 1.6 - 0.8).requires_grad_()  # (1, N, 1, 2)
    z = torch.randn(rows, neurons, 1, 2)  # (B·T, N, 1, 2)
    weights = torch.randn(1, channels, neurons, 1)
    params = [features, sigma, mu]

    def grid() -> torch.Tensor:
        return (torch.einsum("ancd,bnid->bnic", sigma, z) + mu).clamp(-1, 1)  # (B·T, N, 1, 2), strided

    def read(g: torch.Tensor) -> torch.Tensor:
        y = F.grid_sample(features, g, mode="bilinear", padding_mode="zeros", align_corners=True)  # (B·T, C, N, 1)
        return (y * weights).sum()

    def original() -> torch.Tensor:
        return read(grid())

    def ours() -> torch.Tensor:
        return read(grid().contiguous())

    a, b = original(), ours()
    ga, gb = torch.autograd.grad(a, params), torch.autograd.grad(b, params)
    diffs = ", ".join(
        f"{n} {(x - y).abs().max().item():.1e}" for n, x, y in zip(("features", "σ", "μ"), ga, gb, strict=True)
    )
    print(
        f"\n{channels} channels, {neurons} neurons: grid strides {tuple(grid().stride())}; "
        f"|Δ| value {abs(a - b).item():.1e} of {abs(a).item():.1e}; |Δ| gradients: {diffs}"
    )
    times = time_steps({"original": (original, params), "contiguous grid": (ours, params)}, iters)
    report("bench_readout.py", argv, rows, times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--rows", type=int, default=8 * 62, help="batch × output frames")
    ns = parser.parse_args(argv)
    torch.manual_seed(0)
    for channels, neurons in ((128, 8000), (16, 1000)):
        compare(ns.rows, channels, neurons, ns.iters, argv)


if __name__ == "__main__":
    main()
