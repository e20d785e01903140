"""Factorized baseline: parameter counts pinned to the original, shapes, alignment, gradients, readout, regularisers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_sensorium.data.batch import NeuronInfo
from lightning_sensorium.models import ELU1, Encoder, Factorized3dCore, GaussianReadout, MLPShifter
from lightning_sensorium.models.layers import (
    behavior_as_channels,
    depth_laplace_l21d,
    laplace_l2norm,
    strided_spatial_conv,
)

#: Neuron counts of the 5 scored ("new") mice, in the order of models.md.
COMPETITION_NEURONS = (7863, 7908, 8202, 7939, 8122)
SMALL = (4, 6, 8)  # hidden channels of a core that is cheap to run at full frame size


def make_neurons(n: int, mouse: str = "m", seed: int = 0) -> NeuronInfo:
    rng = np.random.default_rng(seed)
    return NeuronInfo(mouse, np.arange(n), rng.uniform(0, 500, (n, 3)), rng.uniform(0.5, 2, n))


def zero_neurons(n: int, mouse: str) -> NeuronInfo:
    return NeuronInfo(mouse, np.zeros(n, dtype=np.int64), np.zeros((n, 3)), np.zeros(n))


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def make_encoder(seed: int = 0, **mice: int) -> Encoder:
    torch.manual_seed(seed)
    neurons = {m: make_neurons(n, m, i) for i, (m, n) in enumerate(mice.items())}
    return Encoder.build(Factorized3dCore(hidden_channels=SMALL), GaussianReadout, neurons, MLPShifter)


def gaussian(encoder: Encoder, mouse: str) -> GaussianReadout:
    readout = encoder.readouts[mouse]
    assert isinstance(readout, GaussianReadout)
    return readout


def make_inputs(batch: int = 2, frames: int = 80, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, 1, frames, 36, 64, generator=g)
    return video, torch.randn(batch, 2, frames, generator=g), torch.randn(batch, 2, frames, generator=g)


def test_parameter_counts_match_the_original() -> None:
    core = Factorized3dCore()
    assert count(core) == 382_176
    mice = {f"m{i}": zero_neurons(n, f"m{i}") for i, n in enumerate(COMPETITION_NEURONS)}
    encoder = Encoder.build(core, GaussianReadout, mice, MLPShifter)
    assert count(encoder.readouts["m0"]) == 1_045_931  # 128·N features + 4·N σ + N bias + 152 grid MLP
    assert encoder.shifters is not None
    assert count(encoder.shifters["m0"]) == 57
    # 382_176 + Σ (133·N + 152 + 57) over the 5 mice: "5.71 M" in the official benchmark notebook.
    assert count(encoder) == 5_707_743
    groups = encoder.parameter_groups()
    assert sum(p.numel() for p in groups["core"]) == 382_176
    assert sum(p.numel() for p in groups["readout"]) == 5_707_743 - 382_176


def test_core_output_shape_and_alignment() -> None:
    assert Factorized3dCore().output_shape((1, 80, 36, 64)) == (128, 62, 18, 46)
    assert Factorized3dCore().lost_frames((1, 80, 36, 64)) == 18
    core = Factorized3dCore(hidden_channels=SMALL).eval()
    video, behavior, _ = make_inputs(batch=1)
    out = core(video, behavior)
    assert out.shape == (1, *SMALL[-1:], 62, 18, 46)
    assert core.output_shape((1, 80, 36, 64)) == tuple(out.shape[1:])
    # Causal: output frame k belongs to input frame k + 18 and sees frames k … k + 18 only.
    changed = video.clone()
    changed[:, :, 40] += 1.0
    diff = (core(changed, behavior) - out).abs().amax(dim=(0, 1, 3, 4))  # (T',)
    touched = torch.nonzero(diff > 0).flatten()
    assert touched.min().item() == 40 - 18
    assert touched.max().item() == 40


def test_padding_keeps_the_frame_size_and_the_parameters_and_stays_causal() -> None:
    valid, padded = Factorized3dCore(hidden_channels=SMALL), Factorized3dCore(hidden_channels=SMALL, padding=True)
    assert count(padded) == count(valid)  # padding adds no weights
    assert padded.output_shape((1, 80, 36, 64)) == (SMALL[-1], 62, 36, 64)
    video, behavior, _ = make_inputs(batch=1)
    out = padded.eval()(video, behavior)
    assert out.shape == (1, SMALL[-1], 62, 36, 64)
    # A pixel in the corner now reaches the corner of the feature map (valid convolutions drop it) ...
    changed = video.clone()
    changed[:, :, :, 0, 0] += 1.0
    diff = (padded(changed, behavior) - out).abs().amax(dim=(0, 1, 2))  # (H, W)
    assert diff[0, 0] > 0 and diff[-1, -1] == 0
    # ... and time stays causal and valid: output frame k sees input frames k … k + 18 only.
    changed = video.clone()
    changed[:, :, 40] += 1.0
    touched = torch.nonzero((padded(changed, behavior) - out).abs().amax(dim=(0, 1, 3, 4)) > 0).flatten()
    assert (touched.min().item(), touched.max().item()) == (40 - 18, 40)


def test_input_stride_halves_the_grid() -> None:
    assert Factorized3dCore(padding=True, input_stride=2).output_shape((1, 80, 36, 64)) == (128, 62, 18, 32)
    assert Factorized3dCore(input_stride=2).output_shape((1, 80, 36, 64)) == (128, 62, 5, 19)
    assert count(Factorized3dCore(input_stride=2)) == count(Factorized3dCore())
    with pytest.raises(ValueError, match="input_stride"):
        Factorized3dCore(input_stride=0)


@pytest.mark.parametrize(
    ("channels", "kernel", "stride", "padding", "height", "width"),
    [(1, 11, 2, 5, 36, 64), (1, 11, 2, 0, 36, 64), (3, 5, 3, 1, 17, 23), (2, 4, 2, 1, 9, 10), (1, 3, 4, 0, 11, 13)],
)
def test_strided_spatial_conv_is_the_strided_convolution(
    channels: int, kernel: int, stride: int, padding: int, height: int, width: int
) -> None:
    """Space-to-depth then stride 1 gives conv3d's outputs and gradients, for odd sizes, kernels smaller than the
    stride, and several input channels."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, channels, 3, height, width, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(5, channels, 1, kernel, kernel, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, generator=gen, requires_grad=True)
    ref = torch.nn.functional.conv3d(x, weight, bias, (1, stride, stride), (0, padding, padding))
    out = strided_spatial_conv(x, weight, bias, stride, padding)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref)
    probe = torch.randn(ref.shape, dtype=torch.float64, generator=gen)
    for a, b in zip(
        torch.autograd.grad((out * probe).sum(), (x, weight, bias)),
        torch.autograd.grad((ref * probe).sum(), (x, weight, bias)),
        strict=True,
    ):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"\(1, k, k\)"):
        strided_spatial_conv(x, weight.expand(5, channels, 2, kernel, kernel), bias, stride, padding)


@pytest.mark.parametrize(("padding", "stride"), [(False, 1), (True, 1), (True, 2), (False, 3)])
def test_signal_footprints_give_the_convolution_of_constant_channels(padding: bool, stride: int) -> None:
    """The first layer convolves the video alone and adds signal × footprint: the plain convolution over
    ``[video, behaviour maps, pupil maps]`` (the original's computation) gives the same outputs and gradients."""
    core = Factorized3dCore(hidden_channels=SMALL, padding=padding, input_stride=stride, pupil_channels=True)
    video, behavior, pupil = make_inputs(batch=2, frames=20)
    ours = core(video, behavior, pupil)
    plain = core.layers(behavior_as_channels(video, behavior, pupil))  # every channel through conv_spatial
    assert tuple(ours.shape[1:]) == core.output_shape((1, 20, 36, 64))
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)
    weight = core.layers[0].conv_spatial.weight
    (g_ours,) = torch.autograd.grad(ours.square().sum(), weight)
    (g_plain,) = torch.autograd.grad(plain.square().sum(), weight)
    scale = g_plain.abs().max().item()  # float32 sums over ~10⁵ outputs: compare relative to the largest entry
    torch.testing.assert_close(g_ours, g_plain, rtol=1e-4, atol=1e-5 * scale)
    assert g_ours[:, 1:].abs().sum() > 0  # the signals' filters learn


def test_behavior_enters_as_channels_after_the_video() -> None:
    video, behavior, pupil = make_inputs(batch=1, frames=3)
    x = behavior_as_channels(video, behavior, pupil)
    assert x.shape == (1, 5, 3, 36, 64)
    assert torch.equal(x[:, 0], video[:, 0])
    assert torch.equal(x[0, 1:3, :, 7, 9], behavior[0])
    assert torch.equal(x[0, 3:5, :, 0, 0], pupil[0])
    assert behavior_as_channels(video, None) is video
    assert Factorized3dCore().input_channels == 3
    assert Factorized3dCore(pupil_channels=True).input_channels == 5
    with pytest.raises(ValueError, match="behavior"):
        Factorized3dCore(hidden_channels=SMALL)(video)


def test_responses_shape_finite_positive_and_every_parameter_learns() -> None:
    encoder = make_encoder(a=7, b=5).train()
    video, behavior, pupil = make_inputs()
    out = encoder(video, "a", behavior, pupil)
    assert out.shape == (2, 7, 62)
    assert torch.isfinite(out).all()
    assert (out > 0).all()  # ELU + 1
    (out.sum() + encoder.regularizer("a")).backward()
    used = [(n, p) for n, p in encoder.named_parameters() if not n.startswith(("readouts.b.", "shifters.b."))]
    assert [n for n, p in used if p.grad is None or not torch.isfinite(p.grad).all()] == []
    # Conv biases feed BatchNorm (train mode), which cancels them: ~0 gradient, as in the original.
    learning = [(n, p) for n, p in used if not (n.startswith("core.") and n.endswith(".bias") and ".conv_" in n)]
    assert [n for n, p in learning if p.grad.abs().sum() == 0] == []  # type: ignore[union-attr]
    # Every neuron's own feature weights receive a gradient (not one neuron's weights shared by all).
    features_grad = gaussian(encoder, "a").features.grad
    assert features_grad is not None
    assert (features_grad.abs().sum(dim=(0, 1, 2)) > 0).all()
    assert all(p.grad is None for n, p in encoder.named_parameters() if n.startswith("readouts.b."))


def test_eval_is_deterministic_and_training_samples() -> None:
    encoder = make_encoder(a=6)
    video, behavior, pupil = make_inputs(batch=1, frames=24)
    encoder.eval()
    with torch.no_grad():
        assert torch.equal(encoder(video, "a", behavior, pupil), encoder(video, "a", behavior, pupil))
    readout = gaussian(encoder, "a").train()
    first, second = readout.sample_grid(3), readout.sample_grid(3)
    assert first.shape == (3, 6, 1, 2)
    assert not torch.equal(first, second)
    assert not torch.equal(first[0], first[1])  # a fresh sample per (batch · frame) row
    assert first.abs().max() <= 1.0
    readout.eval()
    assert torch.equal(readout.sample_grid(2)[0], readout.positions().clamp(-1, 1)[:, None])


def test_shift_is_added_after_the_clamp_and_moves_the_grid() -> None:
    readout = GaussianReadout((1, 9, 9), make_neurons(3)).eval()
    ramp = torch.arange(9.0).repeat(9, 1)  # value = column index: grows with x
    x = ramp.reshape(1, 1, 1, 9, 9)
    base = readout(x)  # (1, 3, 1)
    right = readout(x, torch.tensor([[[0.25, 0.0]]]))
    # align_corners=True: x in [-1, 1] spans 8 columns, so a 0.25 shift reads 1 column further (inside the frame).
    inside = readout.positions()[:, 0].clamp(-1, 1) + 0.25 <= 1
    expected = base + 1.0 * readout.features.view(-1)[:, None]
    torch.testing.assert_close(right[0][inside], expected[0][inside])
    # Far outside the frame (possible only because the shift comes after the clamp): zero padding, bias only.
    away = readout(x, torch.tensor([[[5.0, 0.0]]]))
    torch.testing.assert_close(away[0, :, 0], readout.bias.detach())  # type: ignore[union-attr]


def test_readout_init_follows_the_original() -> None:
    info = make_neurons(6)
    readout = GaussianReadout((2, 5, 5), info)
    np.testing.assert_allclose(readout.bias.detach().numpy(), info.mean_responses, rtol=1e-6)  # type: ignore[union-attr]
    assert torch.equal(readout.features, torch.full((1, 2, 1, 6), 0.5))
    assert readout.sigma.shape == (1, 6, 2, 2)
    assert readout.sigma.abs().max() <= 1.0
    xy = info.coordinates[:, :2] - info.coordinates[:, :2].mean(0)
    np.testing.assert_allclose(readout.source_grid.numpy(), xy / np.abs(xy).max(), rtol=1e-6)
    assert "source_grid" in readout.state_dict()  # a checkpoint rebuilds positions without the data
    assert readout.positions().shape == (6, 2)
    assert readout.regularizer().item() == 0.0
    l1 = GaussianReadout((2, 5, 5), info, feature_reg_weight=0.1)
    assert l1.regularizer().item() == pytest.approx(0.1 * 12 * 0.5)


def test_feature_init_std_breaks_the_symmetry_of_the_constant_init() -> None:
    info = make_neurons(500)
    torch.manual_seed(0)
    noisy = GaussianReadout((4, 5, 5), info, feature_init_std=0.25)
    w = noisy.features.detach()
    assert w.shape == (1, 4, 1, 500)
    assert abs(w.mean().item() - 0.25) < 0.02  # centred on the original's 1/C
    assert abs(w.std().item() - 0.25) < 0.02
    torch.manual_seed(0)
    assert torch.equal(GaussianReadout((4, 5, 5), info, feature_init_std=0.25).features, noisy.features)  # seeded
    with pytest.raises(ValueError, match="feature_init_std"):
        GaussianReadout((4, 5, 5), info, feature_init_std=-0.1)


def test_laplace_regularisers_match_hand_computation() -> None:
    # Laplace [[0,-1,0],[-1,4,-1],[0,-1,0]] with zero padding on a 3×3 filter of ones:
    # centre 4−4 = 0, edge middles 4−3 = 1, corners 4−2 = 2 → Σ(L∗w)² = 4·1 + 4·4 = 20, Σw² = 9.
    assert laplace_l2norm(torch.ones(1, 1, 3, 3)).item() == pytest.approx(20 / 9)
    # [-1, 4, -1] on ones(3) with zero padding: [3, 2, 3] → Σ² = 22, Σw² = 3.
    assert depth_laplace_l21d(torch.ones(1, 1, 3)).item() == pytest.approx(22 / 3)
    core = Factorized3dCore(
        hidden_channels=(1,), spatial_input_kernel=3, temporal_input_kernel=3, behavior_channels=False
    )
    block = core._input_block()
    with torch.no_grad():
        block.conv_spatial.weight.fill_(1.0)
        block.conv_temporal.weight.fill_(1.0)
    assert core.regularizer().item() == pytest.approx(10 * 20 / 9 + 0.01 * 22 / 3)
    assert (
        150 < Factorized3dCore().regularizer().item() < 250
    )  # ≈ 195 at init, as the original's reports (docs/models.md: Factorized baseline)


def test_encoder_aligns_the_shifter_to_the_last_frames_and_needs_pupil_center() -> None:
    encoder = make_encoder(a=5).eval()
    video, behavior, pupil = make_inputs(batch=1, frames=30)
    with torch.no_grad():
        out = encoder(video, "a", behavior, pupil)  # (1, 5, 12)
        early = pupil.clone()
        early[..., :18] += 3.0  # frames without an output: no effect
        assert torch.equal(encoder(video, "a", behavior, early), out)
        late = pupil.clone()
        late[..., 25] += 3.0  # input frame 25 ↔ output frame 25 − 18 = 7 only
        diff = (encoder(video, "a", behavior, late) - out).abs().amax(dim=(0, 1))
    assert torch.nonzero(diff).flatten().tolist() == [7]
    with pytest.raises(ValueError, match="pupil_center"):
        encoder(video, "a", behavior)


def test_float32_readout_reads_the_autocast_core_in_float32() -> None:
    """Under bf16 autocast, ``float32_readout`` gives float32 responses: the readout of the bf16 core features
    in float32, exactly; without it the readout computes in bf16 and its rounding shows."""
    encoder = make_encoder(a=7).eval()
    video, behavior, pupil = make_inputs(batch=1, frames=30)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        features = encoder.core(video, behavior, pupil)
        low = encoder(video, "a", behavior, pupil)
        encoder.float32_readout = True
        high = encoder(video, "a", behavior, pupil)
    assert features.dtype == torch.bfloat16 and high.dtype == torch.float32
    with torch.no_grad():
        expected = encoder.read(features.float(), "a", behavior, pupil)  # no autocast: float32 throughout
    assert torch.equal(high, expected)
    assert not torch.equal(low.float(), expected)
    assert torch.allclose(low.float(), expected, rtol=0.05, atol=0.05)


def test_elu1_is_positive_and_offsets() -> None:
    x = torch.tensor([-50.0, 0.0, 2.0])
    torch.testing.assert_close(ELU1()(x), torch.tensor([math.exp(-50.0), 1.0, 3.0]))
    torch.testing.assert_close(ELU1(offset=1.0)(torch.zeros(1)), torch.tensor([2.0]))
