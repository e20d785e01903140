"""Dynamic-V1FM: parameter counts pinned to the original, shifted-window attention against a dense softmax reference,
the hierarchical readout's levels and fusions, gradients, and the mmcv learning-rate schedule."""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_sensorium.data.batch import NeuronInfo
from lightning_sensorium.models.cores.swin3d import (
    ShiftedWindowAttention3d,
    Swin3dCore,
    SwinBlock,
    fit_window,
    relative_position_index,
)
from lightning_sensorium.models.encoder import Encoder
from lightning_sensorium.models.readouts.gaussian import GaussianReadout
from lightning_sensorium.models.readouts.hierarchical_gaussian import AdaptiveFusion, HierarchicalGaussianReadout
from lightning_sensorium.models.shifters import MLPShifter
from lightning_sensorium.schedulers import WarmupCosineRestart

#: Neuron counts of the 10 mice (5 new, then 5 old), in the order of models.md.
ALL_NEURONS = (7863, 7908, 8202, 7939, 8122, 7440, 7928, 8285, 7671, 7495)
#: A core small enough to run at full frame size in tests.
TINY = {"embed_dim": 8, "num_heads": 2, "mlp_hidden": 4, "num_blocks": 2, "window_size": (2, 3, 4)}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def zero_neurons(n: int, mouse: str) -> NeuronInfo:
    return NeuronInfo(mouse, np.zeros(n, dtype=np.int64), np.zeros((n, 3)), np.zeros(n))


def make_neurons(n: int, mouse: str = "m", seed: int = 0) -> NeuronInfo:
    rng = np.random.default_rng(seed)
    return NeuronInfo(mouse, np.arange(n), rng.uniform(0, 500, (n, 3)), rng.uniform(0.5, 2, n))


def block(core: Swin3dCore, index: int = 0) -> SwinBlock:
    module = core.blocks[index]
    assert isinstance(module, SwinBlock)
    return module


def fusion_mlp(readout: HierarchicalGaussianReadout, inputs: int) -> torch.nn.Sequential:
    module = readout.fusions[str(inputs)]
    assert isinstance(module, AdaptiveFusion)
    return module.mlp


def make_inputs(batch: int = 2, frames: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, 1, frames, 36, 64, generator=g)
    return video, torch.randn(batch, 2, frames, generator=g), torch.randn(batch, 2, frames, generator=g)


# ------------------------------------------------------------------------------------------------ parameter counts
def test_parameter_counts_match_the_original() -> None:
    """Counts computed by building the original modules with config/neuroencoding.py (docs/models.md: Dynamic-V1FM)."""
    core = Swin3dCore()
    assert count(core) == 2_273_488
    assert count(core.patch_embedding) + count(core.norm) == 2_464
    first = block(core)
    assert (count(first.attention), count(first.mlp), count(first.behavior_mlp)) == (211_740, 342_800, 13_216)
    assert first.attention.relative_position_bias_table.shape == (15 * 13 * 13, 4)

    mice = {f"m{i}": zero_neurons(n, f"m{i}") for i, n in enumerate(ALL_NEURONS)}
    shifter = functools.partial(MLPShifter, hidden_channels=16)
    mean = Encoder.build(core, HierarchicalGaussianReadout, mice, shifter, frames=30)
    assert mean.shifters is not None
    assert count(mean.shifters["m0"]) == 354
    # 224·(N + N//2 + N//4 + N//8 + N//16) features + 4·N σ + N bias + 162 grid MLP + 1,440 refinement MLPs.
    assert count(mean.readouts["m0"]) == 3_452_885
    assert sum(count(r) for r in mean.readouts.values()) == 34_628_973
    assert count(mean) == 36_906_001  # "≈ 36.9 M"
    adaptive = Encoder.build(
        core, functools.partial(HierarchicalGaussianReadout, fusion="adaptive"), mice, shifter, frames=30
    )
    assert count(adaptive.readouts["m0"]) == 3_453_021  # + fusion MLPs for 2, 3, 4 and 5 inputs: 136
    assert count(adaptive) == 36_907_361
    # Only what the chosen levels use: base + level 2 (features 224·3931, refinement 96).
    lean = HierarchicalGaussianReadout((224, 18, 32), zero_neurons(7863, "m"), levels=(2,), allocate_all_levels=False)
    assert count(lean) == 224 * (7863 + 3931) + 5 * 7863 + 162 + 96


def test_core_shapes_and_output_shape() -> None:
    assert Swin3dCore().output_shape((1, 30, 36, 64)) == (224, 15, 18, 32)
    assert Swin3dCore().lost_frames((1, 30, 36, 64)) == 15  # 15 tokens ↔ the last 15 frames
    core = Swin3dCore(**TINY).eval()  # type: ignore[arg-type]
    for frames in (8, 7):  # 7: the video and the signals are padded to 8
        video, behavior, pupil = make_inputs(frames=frames)
        with torch.no_grad():
            out = core(video, behavior, pupil)
        assert out.shape == (2, 8, 4, 18, 32)
        assert core.output_shape((1, frames, 36, 64)) == tuple(out.shape[1:])
        assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="pupil_center"):
        core(video, behavior)


def test_init_follows_the_original() -> None:
    torch.manual_seed(0)
    core = Swin3dCore()
    linear = block(core).mlp.linear1
    assert linear.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert linear.weight.abs().max().item() <= 2.0  # trunc_normal's absolute bounds
    assert torch.equal(linear.bias, torch.zeros_like(linear.bias))
    table = block(core).attention.relative_position_bias_table
    assert table.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.equal(core.norm.weight, torch.ones(224))
    assert not any("norm" in name for name, _ in core.blocks.named_modules())  # no LayerNorm inside blocks
    assert all(block(core, i).attention.shift_size == (4, 3, 3) for i in range(4))  # every block is shifted


def test_behaviour_mlp_concatenates_the_frames_of_a_patch() -> None:
    core = Swin3dCore(**TINY)  # type: ignore[arg-type]
    mlp = block(core).behavior_mlp
    signals = torch.randn(2, 6, 4)  # (B, T, 4)
    out = mlp(signals)
    assert out.shape == (2, 3, 8)
    torch.testing.assert_close(out[:, 1, :4], mlp.mlp(signals[:, 2]))  # token 1 = [frame 2 | frame 3]
    torch.testing.assert_close(out[:, 1, 4:], mlp.mlp(signals[:, 3]))
    # The behaviour reaches the features: pupil centre and behaviour both matter.
    video, behavior, pupil = make_inputs()
    with torch.no_grad():
        base = core.eval()(video, behavior, pupil)
        assert not torch.equal(core(video, behavior + 1, pupil), base)
        assert not torch.equal(core(video, behavior, pupil + 1), base)


# ------------------------------------------------------------------------------------------ shifted-window attention
def _regions(coord: torch.Tensor, padded: int, window: int, shift: int) -> torch.Tensor:
    """Region label of a rolled coordinate along one axis: [0, P−w) → 0, [P−w, P−s) → 1, [P−s, P) → 2."""
    if shift == 0:
        return torch.zeros_like(coord)
    return (coord >= padded - window).long() + (coord >= padded - shift).long()


def dense_reference(attn: ShiftedWindowAttention3d, x: torch.Tensor) -> torch.Tensor:
    """The same attention written over ALL tokens with an explicit softmax: −inf between windows, −100 between
    regions, the relative-position bias looked up per token pair from coordinates."""
    b, t, h, w, c = x.shape
    window, shift = fit_window((t, h, w), attn.window_size, attn.shift_size)
    pads = [(-s) % win for s, win in zip((t, h, w), window, strict=True)]
    x = F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
    padded = x.shape[1:4]
    x = torch.roll(x, shifts=[-s for s in shift], dims=(1, 2, 3))
    tokens = x.reshape(b, -1, c)  # (B, L, C), row-major over the rolled grid
    grid = torch.meshgrid(*(torch.arange(p) for p in padded), indexing="ij")
    coords = torch.stack(grid, -1).reshape(-1, 3)  # (L, 3)
    win = torch.tensor(window)
    same_window = (coords[:, None] // win == coords[None] // win).all(-1)  # (L, L)
    region = torch.stack([_regions(coords[:, i], padded[i], window[i], shift[i]) for i in range(3)], -1)
    same_region = (region[:, None] == region[None]).all(-1)  # (L, L)
    local = coords % win
    rel = local[:, None] - local[None] + win - 1  # (L, L, 3)
    full = attn.window_size
    index = rel[..., 0] * (2 * full[1] - 1) * (2 * full[2] - 1) + rel[..., 1] * (2 * full[2] - 1) + rel[..., 2]
    bias = attn.relative_position_bias_table[index].permute(2, 0, 1)  # (heads, L, L)
    heads, d = attn.num_heads, c // attn.num_heads
    q, k, v = attn.qkv(tokens).view(b, -1, 3, heads, d).permute(2, 0, 3, 1, 4)  # (B, heads, L, d) each
    logits = q @ k.transpose(-1, -2) / math.sqrt(d) + bias + torch.where(same_region, 0.0, -100.0)
    logits = logits.masked_fill(~same_window, float("-inf"))
    out = (torch.softmax(logits, -1) @ v).transpose(1, 2).reshape(b, -1, c)  # (B, L, C)
    out = attn.proj(out).view(b, *padded, c)
    out = torch.roll(out, shifts=list(shift), dims=(1, 2, 3))
    return out[:, :t, :h, :w]


@pytest.mark.parametrize("shift", [(1, 1, 2), (0, 1, 0), (0, 0, 0)])
def test_attention_equals_a_plain_softmax_reference(shift: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    attn = ShiftedWindowAttention3d(dim=8, window_size=(2, 3, 4), shift_size=shift, num_heads=2)
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()  # make the bias matter
    x = torch.randn(2, 5, 7, 9, 8)  # pads to (6, 9, 12): 3 × 3 × 3 windows
    torch.testing.assert_close(attn(x), dense_reference(attn, x), atol=1e-5, rtol=1e-5)


def test_tokens_in_different_windows_do_not_attend() -> None:
    torch.manual_seed(0)
    attn = ShiftedWindowAttention3d(dim=8, window_size=(2, 3, 3), shift_size=(1, 1, 1), num_heads=2).eval()
    x = torch.randn(1, 4, 6, 6, 8)
    base = attn(x)
    changed = x.clone()
    changed[0, 0, 0, 0] += 5.0  # token (0, 0, 0) → rolled (3, 5, 5): the last window, corner region
    touched = ((attn(changed) - base).abs().amax(-1) > 1e-6)[0]  # (T, H, W)
    # In the rolled frame, (3, 5, 5) shares window (1, 1, 1) and region (2, 2, 2) only with itself: coordinates
    # 3 ∈ [P − s, P) for T (P=4, s=1) and 5 ∈ [5, 6) for H, W. Everything else is masked (−100) or another window.
    assert torch.nonzero(touched).tolist() == [[0, 0, 0]]
    changed = x.clone()
    changed[0, 1, 2, 2] += 5.0  # rolled (0, 1, 1): window (0, 0, 0), region (0, 0, 0) = rolled [0, 2) × [0, 3)²
    touched = ((attn(changed) - base).abs().amax(-1) > 1e-6)[0]
    expected = {(tt, hh, ww) for tt in (1, 2) for hh in (1, 2, 3) for ww in (1, 2, 3)}  # original frame: +1
    assert {tuple(i) for i in torch.nonzero(touched).tolist()} == expected


def test_windows_shrink_to_small_grids_without_shift() -> None:
    assert fit_window((4, 18, 32), (8, 7, 7), (4, 3, 3)) == ((4, 7, 7), (0, 3, 3))
    assert fit_window((15, 7, 32), (8, 7, 7), (4, 3, 3)) == ((8, 7, 7), (4, 0, 3))
    # A temporally shrunk window reads the first block of the full index: exact (time is the slowest axis).
    full, small = relative_position_index((8, 7, 7)), relative_position_index((4, 7, 7))
    table = torch.randn(15 * 13 * 13)
    offsets_full = table[full[: 4 * 49, : 4 * 49]]
    assert offsets_full.shape == small.shape
    pairs = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(7), torch.arange(7), indexing="ij")).flatten(1)
    # Pair (i, j) of the small window must read the table at the full-window index of the same offset.
    rel = (pairs[:, :, None] - pairs[:, None, :]).permute(1, 2, 0) + torch.tensor([7, 6, 6])
    torch.testing.assert_close(offsets_full, table[rel[..., 0] * 169 + rel[..., 1] * 13 + rel[..., 2]])


# ---------------------------------------------------------------------------------------------------------- readout
def _readout(n: int = 37, **kwargs: object) -> HierarchicalGaussianReadout:
    torch.manual_seed(0)
    readout = HierarchicalGaussianReadout((3, 5, 7), make_neurons(n), **kwargs)  # type: ignore[arg-type]
    with torch.no_grad():  # distinct level features and refinements, so a mix-up shows
        for p in readout.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return readout


def test_base_level_alone_is_the_gaussian_readout() -> None:
    readout = _readout(levels=())
    plain = GaussianReadout((3, 5, 7), make_neurons(37), init_sigma=0.2, grid_hidden_features=32)
    plain.load_state_dict({k: v for k, v in readout.state_dict().items() if k in plain.state_dict()})
    features, shift = torch.randn(2, 3, 4, 5, 7), 0.1 * torch.randn(2, 4, 2)
    torch.testing.assert_close(readout.eval()(features, shift), plain.eval()(features, shift))
    torch.manual_seed(3)
    a = readout.train()(features, shift)
    torch.manual_seed(3)
    torch.testing.assert_close(a, plain.train()(features, shift))


def _expected_levels(readout: HierarchicalGaussianReadout, features: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``(L, B·T, N)``: base and refined levels, the subsampling written with explicit neuron indices."""
    b, c, t, h, w = features.shape
    n = readout.num_neurons
    x = features.transpose(1, 2).reshape(b * t, c, h, w)
    grid = readout.positions().clamp(-1, 1)[None, :, None, :] + shift.reshape(b * t, 1, 1, 2)  # eval: μ
    outs = [readout._read(x, grid, readout.features)]
    for k in readout.levels:
        m = n // k
        picks = torch.tensor([j * n // m for j in range(m)])  # virtual neuron j reads neuron ⌊j N / m⌋
        y = readout._read(x, grid[:, picks], readout.level_features[str(k)])  # (B·T, m)
        back = torch.tensor([i * m // n for i in range(n)])  # neuron i takes virtual neuron ⌊i m / N⌋
        outs.append(readout.refinements[str(k)](y[:, None, back])[:, 0])
    return torch.stack(outs)


def test_mean_fusion_averages_the_subsampled_levels() -> None:
    readout = _readout(levels=(2, 8), fusion="mean").eval()
    features, shift = torch.randn(2, 3, 4, 5, 7), 0.1 * torch.randn(2, 4, 2)
    with torch.no_grad():
        expected = _expected_levels(readout, features, shift).mean(0) + readout.bias  # type: ignore[operator]
        torch.testing.assert_close(readout(features, shift), expected.reshape(2, 4, 37).transpose(1, 2))
        # Level 8 groups neighbours in the neuron INDEX: neurons 0–7 share one read position.
        levels = _expected_levels(readout, features, shift)
        coarse = readout.level_features["8"]
        assert coarse.shape == (1, 3, 1, 4)  # 37 // 8
        assert not torch.allclose(levels[0], levels[2])


def test_adaptive_fusion_weighs_levels_per_sample() -> None:
    readout = _readout(levels=(2, 4, 16), fusion="adaptive").eval()
    assert sorted(readout.fusions) == ["2", "3", "4", "5"]  # the original allocates every size
    features, shift = torch.randn(3, 3, 4, 5, 7), 0.1 * torch.randn(3, 4, 2)
    with torch.no_grad():
        levels = _expected_levels(readout, features, shift).view(4, 3, 4, 37).transpose(0, 1)  # (B, L, T, N)
        weights = fusion_mlp(readout, 4)(levels.mean(dim=(2, 3)))  # (B, L), sigmoid: not normalised
        assert not torch.allclose(weights[0], weights[1])
        expected = (levels * weights[:, :, None, None]).sum(1) + readout.bias  # (B, T, N)
        torch.testing.assert_close(readout(features, shift), expected.transpose(1, 2))


def test_readout_options_are_checked() -> None:
    with pytest.raises(ValueError, match="levels"):
        HierarchicalGaussianReadout((3, 5, 7), make_neurons(40), levels=(2, 2))
    with pytest.raises(ValueError, match="levels"):
        HierarchicalGaussianReadout((3, 5, 7), make_neurons(40), levels=(1,))
    with pytest.raises(ValueError, match="fusion"):
        HierarchicalGaussianReadout((3, 5, 7), make_neurons(40), fusion="max")  # type: ignore[arg-type]
    lean = HierarchicalGaussianReadout(
        (3, 5, 7), make_neurons(40), levels=(4,), fusion="adaptive", allocate_all_levels=False
    )
    assert sorted(lean.level_features) == ["4"] and sorted(lean.fusions) == ["2"]
    readout = HierarchicalGaussianReadout((3, 5, 7), make_neurons(40))
    assert readout.sigma.abs().max() <= 0.2 and readout.grid_predictor[0].out_features == 32
    assert [count(readout.refinements[k]) for k in ("2", "4", "8", "16")] == [96, 192, 384, 768]  # 3 · 16k


# -------------------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("fusion", ["mean", "adaptive"])
def test_every_parameter_learns_and_outputs_are_finite(fusion: Literal["mean", "adaptive"]) -> None:
    torch.manual_seed(0)
    core = Swin3dCore(**TINY, drop_path=0.1, dropout=0.1)  # type: ignore[arg-type]
    readout = functools.partial(HierarchicalGaussianReadout, fusion=fusion, allocate_all_levels=False)
    neurons = {"a": make_neurons(20, "a"), "b": make_neurons(17, "b", 1)}
    encoder = Encoder.build(core, readout, neurons, functools.partial(MLPShifter, hidden_channels=16), frames=8)
    encoder.train()
    video, behavior, pupil = make_inputs()
    out = encoder(video, "a", behavior, pupil)
    assert out.shape == (2, 20, 4)
    assert torch.isfinite(out).all() and (out > 0).all()  # ELU + 1
    out.sum().backward()
    used = [(n, p) for n, p in encoder.named_parameters() if not n.startswith(("readouts.b.", "shifters.b."))]
    missing = [n for n, p in used if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert missing == []
    # With every level allocated, as the original, the unused adaptive fusion MLPs get no gradient.
    full = HierarchicalGaussianReadout((8, 18, 32), make_neurons(20), levels=(2,), fusion="adaptive")
    full(torch.randn(1, 8, 2, 18, 32), torch.zeros(1, 2, 2)).sum().backward()
    assert all(p.grad is not None for p in fusion_mlp(full, 2).parameters())
    assert all(p.grad is None for p in fusion_mlp(full, 5).parameters())
    assert full.level_features["16"].grad is None


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    video, behavior, pupil = make_inputs(batch=1, frames=4)
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        core = Swin3dCore(**TINY, grad_checkpointing=flag).train()  # type: ignore[arg-type]
        core(video, behavior, pupil).square().sum().backward()
        grads.append(block(core).attention.qkv.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


# ------------------------------------------------------------------------------------------------------- schedule
def test_schedule_is_mmcv_warmup_then_cosine_restart() -> None:
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    groups: list[dict[str, Any]] = [{"params": params[:1]}, {"params": params[1:], "lr": 2e-3}]
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    schedule = WarmupCosineRestart(optimizer, steps_per_epoch=10, warmup_steps=30)
    rate = schedule.rate
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 / 3)  # step 0: lr / 3
    assert optimizer.param_groups[1]["lr"] == pytest.approx(2e-3 / 3)
    assert rate(15, 1e-3) == pytest.approx(1e-3 * (1 - 0.5 * 2 / 3))
    assert rate(30, 1e-3) == rate(799, 1e-3) == pytest.approx(1e-3)  # constant for 80 epochs (cosine 1e-3 → 1e-3)
    assert rate(800, 1e-3) == pytest.approx(1e-3)
    assert rate(1300, 1e-3) == pytest.approx((1e-3 + 1e-6) / 2)  # epoch 130: half way down
    assert rate(1799, 1e-3) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * 0.99)))
    assert rate(5000, 1e-3) == pytest.approx(1e-6)  # past the last period: stays at the last min_lr
    # With another base rate the first period is a real cosine down to 1e-3, as the original (absolute min_lr).
    assert rate(400, 2e-3) == pytest.approx(1e-3 + 0.5 * 1e-3 * (1 + math.cos(math.pi * 40 / 80)))
    for _ in range(31):
        optimizer.step()
        schedule.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="same length"):
        WarmupCosineRestart(optimizer, steps_per_epoch=10, periods=(80,), min_lr=(1e-3, 1e-6))
