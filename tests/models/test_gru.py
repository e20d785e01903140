"""GRU baseline: parameter counts pinned to the original, shapes, rotation equivariance, causality, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_sensorium.data.batch import NeuronInfo
from lightning_sensorium.models import Encoder, GaussianReadout, MLPShifter
from lightning_sensorium.models.cores.cnn_gru import CnnGruCore, ConvGRU, HermiteConv2d, hermite_basis
from lightning_sensorium.models.layers import laplace_l2norm

#: Neuron counts of the 5 scored ("new") mice, in the order of models.md.
COMPETITION_NEURONS = (7863, 7908, 8202, 7939, 8122)

#: A core that is cheap to run at full frame size: 2 filters × 4 rotations, 3 layers, a 4-channel GRU.
SMALL = {"hidden_channels": 2, "num_rotations": 4, "layers": 3, "gru_channels": 4}


def make_neurons(n: int, mouse: str = "m", seed: int = 0) -> NeuronInfo:
    rng = np.random.default_rng(seed)
    return NeuronInfo(mouse, np.arange(n), rng.uniform(0, 500, (n, 3)), rng.uniform(0.5, 2, n))


def zero_neurons(n: int, mouse: str) -> NeuronInfo:
    return NeuronInfo(mouse, np.zeros(n, dtype=np.int64), np.zeros((n, 3)), np.zeros(n))


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def make_inputs(batch: int = 2, frames: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, 1, frames, 36, 64, generator=g)
    return video, torch.randn(batch, 2, frames, generator=g), torch.randn(batch, 2, frames, generator=g)


def small_core(**overrides: int | float | bool) -> CnnGruCore:
    torch.manual_seed(0)
    return CnnGruCore(**{**SMALL, **overrides})  # type: ignore[arg-type]


def test_parameter_counts_match_the_original() -> None:
    core = CnnGruCore()
    # Hermite coefficients 45·3·8 + 3 · 28·64·8, BatchNorm 4 · 16: the original's trainable core
    # (docs/models.md: GRU baseline).
    assert count(core.cnn) == 1_080 + 3 * 14_336 + 64 == 44_152
    assert count(core.gru) == 6 * (64 * 64 * 81 + 64) == 1_991_040
    assert all(p.requires_grad for p in core.parameters())  # the basis and rotations are buffers, not parameters
    assert {n.rsplit(".", 1)[-1] for n, _ in core.named_buffers()} >= {"basis", "rotations"}
    assert not any(k.endswith((".basis", ".rotations")) for k in core.state_dict())  # rebuilt, not checkpointed
    assert core.output_shape((1, 80, 36, 64)) == (64, 80, 28, 56)
    assert core.lost_frames((1, 80, 36, 64)) == 0
    mice = {f"m{i}": zero_neurons(n, f"m{i}") for i, n in enumerate(COMPETITION_NEURONS)}
    encoder = Encoder.build(core, GaussianReadout, mice, MLPShifter)
    assert count(encoder.readouts["m0"]) == 542_699  # 64·N features + 4·N σ + N bias + 152 grid MLP
    assert encoder.shifters is not None
    assert count(encoder.shifters["m0"]) == 57
    # 2_035_192 + Σ (69·N + 152 + 57) over the 5 mice: "4.80 M" (docs/models.md: GRU baseline).
    assert count(encoder) == 4_798_583
    groups = encoder.parameter_groups()
    assert sum(p.numel() for p in groups["core"]) == 2_035_192


def test_output_shape_covers_every_frame() -> None:
    core = small_core().eval()
    video, behavior, pupil = make_inputs(batch=2, frames=3)
    with torch.no_grad():
        out = core(video, behavior, pupil)
    assert out.shape == (2, 4, 3, 28, 56)
    assert core.output_shape((1, 3, 36, 64)) == tuple(out.shape[1:])
    assert torch.isfinite(out).all()
    assert out.abs().max() <= 1.0  # a GRU state is a convex mix of tanh values, from h₀ = 0
    padded = small_core(pad_input=True)
    assert padded.output_shape((1, 3, 36, 64)) == (4, 3, 36, 64)
    with pytest.raises(ValueError, match="behavior"):
        core(video)


def test_hermite_basis_is_unit_norm_and_starts_with_a_gaussian() -> None:
    basis, desc, mu = hermite_basis(9, 18, 2 * np.sqrt(9))
    assert basis.shape == (45, 18, 18)
    assert desc[:6] == ["z", "r", "i", "z", "r", "i"]
    assert mu[:6].tolist() == [0, 1, 1, 0, 2, 2]
    np.testing.assert_allclose((basis**2).sum(axis=(1, 2)), 1.0, rtol=1e-12)
    gram = basis.reshape(45, -1) @ basis.reshape(45, -1).T
    assert np.abs(gram - np.eye(45)).max() < 0.05  # sampled Hermite functions: nearly orthonormal
    extent = 2 * np.sqrt(9) * (1 - 1 / 18)
    x = np.linspace(-extent, extent, 18)
    gauss = np.exp(-(x[:, None] ** 2 + x[None] ** 2) / 4)
    np.testing.assert_allclose(basis[0], gauss / np.sqrt((gauss**2).sum()), rtol=1e-10)
    # Values of neuralpredictors' hermite_2d(9, 18, 6) @a2055cd (equal to ours to the last bit).
    np.testing.assert_allclose(basis.sum(axis=(1, 2))[[0, 3, 10]], [7.51960546, 7.51414012, 7.46625082], rtol=1e-8)
    np.testing.assert_allclose(basis[[4, 13, 27], 9, 4], [0.1211742, 0.14759764, -0.08372451], rtol=1e-6)


def test_filter_rotations_are_exact_quarter_turns() -> None:
    conv = HermiteConv2d(3, 2, 9, num_rotations=8).double()
    w = conv.filters().view(8, 2, 3, 9, 9)  # (R, out, in, k, k)
    torch.testing.assert_close(w[2], torch.rot90(w[0], 1, dims=(2, 3)))  # angle 2·2π/8 = a quarter turn
    torch.testing.assert_close(w[4], torch.rot90(w[0], 2, dims=(2, 3)))
    assert (w[1] - w[0]).abs().max() > 1e-3  # the 45° filter is a genuinely different one


@pytest.mark.parametrize("training", [False, True])
def test_cnn_is_rotation_equivariant(training: bool) -> None:
    """Rotating a frame by 90° rotates every feature map by 90° and rolls the rotation blocks by R/4."""
    torch.manual_seed(0)
    core = CnnGruCore(gru_channels=4).double().train(training)  # the baseline's CNN: 4 layers, 8 filters × 8 angles
    g = torch.Generator().manual_seed(3)
    frames = torch.randn(2, 3, 30, 40, generator=g, dtype=torch.float64)
    with torch.no_grad():
        out = core.frame_features(frames)  # (2, R·F, 22, 32)
        rotated = core.frame_features(torch.rot90(frames, 1, dims=(2, 3)))  # (2, R·F, 32, 22)
    r, f = 8, 8
    expected = torch.rot90(out, 1, dims=(2, 3)).reshape(2, r, f, 32, 22).roll(2, dims=1).reshape(rotated.shape)
    torch.testing.assert_close(rotated, expected)
    wrong = torch.rot90(out, 1, dims=(2, 3)).reshape(2, r, f, 32, 22).roll(1, dims=1).reshape(rotated.shape)
    assert (rotated - wrong).abs().max() > 1e-2


def test_gru_is_causal_and_past_outputs_ignore_future_frames() -> None:
    core = small_core().eval()
    video, behavior, _ = make_inputs(batch=1, frames=6)
    with torch.no_grad():
        out = core(video, behavior)
        changed = video.clone()
        changed[:, :, 3] += 1.0
        diff = (core(changed, behavior) - out).abs().amax(dim=(0, 1, 3, 4))  # (T,)
        later = behavior.clone()
        later[..., 5] += 1.0
        last = (core(video, later) - out).abs().amax(dim=(0, 1, 3, 4))
    assert torch.equal(diff[:3], torch.zeros(3))
    assert (diff[3:] > 0).all()  # the change persists through the recurrent state
    assert torch.equal(last[:5], torch.zeros(5))
    assert last[5] > 0


def test_fused_gru_equals_the_original_cell_equations() -> None:
    torch.manual_seed(0)
    gru = ConvGRU(3, 5, input_kernel=3, rec_kernel=5)
    for m in gru.modules():  # non-zero biases, so a mix-up of gates or biases shows
        if isinstance(m, torch.nn.Conv2d) and m.bias is not None:
            torch.nn.init.normal_(m.bias)
    x = torch.randn(2, 3, 4, 7, 9)  # (B, C, T, H, W)
    h = torch.zeros(2, 5, 7, 9)
    expected = []
    for t in range(4):  # ConvGRUCell.forward, one gate convolution at a time
        xt = x[:, :, t]
        update = torch.sigmoid(gru.update_gate_input(xt) + gru.update_gate_hidden(h))
        reset = torch.sigmoid(gru.reset_gate_input(xt) + gru.reset_gate_hidden(h))
        h_t = torch.tanh(gru.out_gate_input(xt) + gru.out_gate_hidden(h * reset))
        h = h * (1 - update) + h_t * update
        expected.append(h)
    with torch.no_grad():
        torch.testing.assert_close(gru(x), torch.stack(expected, dim=2))
    std = gru.update_gate_input.weight.std().item()
    assert std == pytest.approx((2 / (3 * 9 + 5 * 9)) ** 0.5, rel=0.3)  # xavier-normal per gate, not per fused conv


def test_regularizer_is_laplace_plus_group_sparsity() -> None:
    core = small_core(input_reg_weight=2.0, hidden_reg_weight=3.0)
    w0 = core._block(0).conv.filters()
    assert w0.shape == (4 * 2, 3, 9, 9)
    norms = [core._block(i).conv.filters().pow(2).sum(dim=(2, 3)).sqrt() for i in (1, 2)]  # (R·F, R·F) each
    assert norms[0].shape == (8, 8)
    expected = 2.0 * laplace_l2norm(w0) + 3.0 * (norms[0].mean() + norms[1].mean()) / 2
    torch.testing.assert_close(core.regularizer(), expected)
    single = small_core(layers=1, input_reg_weight=2.0)
    torch.testing.assert_close(single.regularizer(), 2.0 * laplace_l2norm(single._block(0).conv.filters()))
    reg = core.regularizer()
    reg.backward()
    assert all(b.conv.coeffs.grad is not None for b in core.cnn)  # type: ignore[union-attr]


def test_encoder_outputs_every_frame_finite_and_every_parameter_learns() -> None:
    torch.manual_seed(0)
    neurons = {"a": make_neurons(7, "a"), "b": make_neurons(5, "b", 1)}
    encoder = Encoder.build(small_core(), GaussianReadout, neurons, MLPShifter).train()
    video, behavior, pupil = make_inputs(batch=2, frames=4)
    out = encoder(video, "a", behavior, pupil)
    assert out.shape == (2, 7, 4)  # T' = T: the loss covers every frame
    assert torch.isfinite(out).all()
    assert (out > 0).all()  # ELU + 1
    (out.sum() + encoder.regularizer("a")).backward()
    used = [(n, p) for n, p in encoder.named_parameters() if not n.startswith(("readouts.b.", "shifters.b."))]
    assert [n for n, p in used if p.grad is None or not torch.isfinite(p.grad).all()] == []
    assert [n for n, p in used if p.grad.abs().sum() == 0] == []  # type: ignore[union-attr]


def test_rotation_shared_batch_norm_pools_rotations() -> None:
    core = small_core(num_rotations=4)
    norm = core._block(0).norm
    assert norm.weight.shape == (2,)
    assert norm.momentum == 0.9
    x = torch.randn(3, 8, 5, 6)  # (N, R·F, H, W), R = 4, F = 2
    y = norm.train()(x)
    for f in range(2):
        pooled = x.view(3, 4, 2, 5, 6)[:, :, f]  # every rotation of feature f
        expected = (pooled - pooled.mean()) / torch.sqrt(pooled.var(unbiased=False) + norm.eps)
        torch.testing.assert_close(y.view(3, 4, 2, 5, 6)[:, :, f], expected, atol=1e-5, rtol=1e-5)
    # Momentum 0.9 (PyTorch convention): the running mean moves 90 % of the way to this batch's mean (from 0).
    batch_mean = x.view(3, 4, 2, 5, 6).mean(dim=(0, 1, 3, 4))
    torch.testing.assert_close(norm.running_mean, 0.9 * batch_mean)
