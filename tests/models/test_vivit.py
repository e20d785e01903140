"""ViV1T: parameter counts pinned to the original, shapes, alignment, attention, readout state encoder, loss."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from lightning_sensorium.data.batch import NeuronInfo
from lightning_sensorium.losses import PoissonCorrelationLoss
from lightning_sensorium.models.cores.vivit import ViViTCore, attention
from lightning_sensorium.models.encoder import Encoder
from lightning_sensorium.models.layers import Exp
from lightning_sensorium.models.readouts.gaussian import GaussianReadout
from lightning_sensorium.models.readouts.vivit import ViViTGaussianReadout
from lightning_sensorium.models.shifters import MLPShifter

#: Neuron counts of the 10 mice ViV1T trains on: the 5 new, then the 5 old (models.md).
ALL_NEURONS = (7863, 7908, 8202, 7939, 8122, 7440, 7928, 8285, 7671, 7495)
#: A core that is cheap at full frame size; no dropout so train-mode runs are deterministic.
SMALL: dict[str, Any] = {
    "dim": 16,
    "heads": 2,
    "head_dim": 8,
    "ff_dim": 24,
    "spatial_depth": 1,
    "temporal_depth": 1,
    "temporal_patch": 5,
    "patch_dropout": 0.0,
    "attention_dropout": 0.0,
    "ff_dropout": 0.0,
    "drop_path": 0.0,
}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def make_neurons(n: int, mouse: str = "m", seed: int = 0) -> NeuronInfo:
    rng = np.random.default_rng(seed)
    return NeuronInfo(mouse, np.arange(n), rng.uniform(0, 500, (n, 3)), rng.uniform(0.5, 2, n))


def make_inputs(batch: int = 2, frames: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, 1, frames, 36, 64, generator=g)
    return video, torch.randn(batch, 2, frames, generator=g), torch.randn(batch, 2, frames, generator=g)


def test_core_parameter_counts_match_the_original() -> None:
    core = ViViTCore()
    assert count(core) == 2_916_074
    assert count(core.tokenizer) == 778_218  # LN(6125) + Linear(6125→112) + LN(112) + positions
    assert count(core.tokenizer.proj) == 686_112
    assert core.tokenizer.spatial_pos.shape == (1, 1, 435, 112)
    assert core.tokenizer.temporal_pos.shape == (1, 276, 1, 112)
    assert core.tokenizer.spatial_pos.numel() + core.tokenizer.temporal_pos.numel() == 79_632
    assert count(core.spatial_transformer) == 801_696  # 3 × 267 232
    assert count(core.temporal_transformer) == 1_336_160  # 5 × 267 232
    assert core.input_channels == 5 and core.grid == (15, 29)
    assert count(ViViTCore(parallel_attention=False)) == 2_920_746


def test_readout_and_model_parameter_counts_match_the_original() -> None:
    readout = ViViTGaussianReadout((112, 15, 29), make_neurons(7863))
    assert count(readout) == 933_563
    assert readout.features.numel() == 880_656
    assert count(readout.state_encoder) == 13_440
    core = ViViTCore()
    readouts = [ViViTGaussianReadout((112, 15, 29), make_neurons(n, f"m{i}")) for i, n in enumerate(ALL_NEURONS)]
    shifters = [MLPShifter() for _ in ALL_NEURONS]
    assert sum(count(s) for s in shifters) == 570
    total = count(core) + sum(count(r) for r in readouts) + sum(count(s) for s in shifters)
    assert total == 2_916_074 + sum(117 * n + 152 + 13_440 for n in ALL_NEURONS) + 570
    assert round(total / 1e6, 2) == 12.28


def test_full_size_core_output_shape_and_lost_frames() -> None:
    core = ViViTCore()
    assert core.output_shape((1, 26, 36, 64)) == (112, 2, 15, 29)
    assert core.lost_frames((1, 26, 36, 64)) == 24
    with pytest.raises(ValueError, match="max_frames"):
        core(*make_inputs(batch=1, frames=24))  # shorter than a tubelet
    with pytest.raises(ValueError, match="max_frames=30"):
        ViViTCore(**SMALL, max_frames=30)(*make_inputs(batch=1, frames=31))
    with pytest.raises(ValueError, match="behavior"):
        core(make_inputs(batch=1, frames=26)[0])
    with pytest.raises(ValueError, match="video_shape"):
        ViViTCore(**SMALL, video_shape=(32, 64))(*make_inputs(batch=1))


def test_tubelets_align_to_their_last_frame_and_time_attention_is_bidirectional() -> None:
    video, behavior, pupil = make_inputs(batch=1, frames=14)
    changed = video.clone()
    changed[:, :, 7] += 1.0
    torch.manual_seed(0)
    local = ViViTCore(**{**SMALL, "temporal_depth": 0}).eval()
    out = local(video, behavior, pupil)
    assert out.shape == (1, 16, 10, 15, 29)
    diff = (local(changed, behavior, pupil) - out).abs().amax(dim=(0, 1, 3, 4))  # (T',)
    # Output frame k is the tubelet of input frames k … k+4: frame 7 is in tubelets 3 … 7.
    assert torch.nonzero(diff > 0).flatten().tolist() == [3, 4, 5, 6, 7]
    full = ViViTCore(**SMALL).eval()
    diff = (full(changed, behavior, pupil) - full(video, behavior, pupil)).abs().amax(dim=(0, 1, 3, 4))
    assert (diff > 0).all()  # no causal mask: every output frame sees every input frame


def test_tokens_are_layer_normed_tubelets_in_the_original_order() -> None:
    torch.manual_seed(0)
    core = ViViTCore(**SMALL).eval()
    video, behavior, pupil = make_inputs(batch=2, frames=8)
    x = torch.cat([video, behavior[..., None, None].expand(-1, -1, -1, 36, 64)], 1)
    x = torch.cat([x, pupil[..., None, None].expand(-1, -1, -1, 36, 64)], 1)  # (B, 5, T, H, W)
    tokens = core.tokenizer(x)  # (B, T', P, D)
    assert tokens.shape == (2, 4, 15 * 29, 16)
    tok = core.tokenizer
    b, t, i, j = 1, 2, 4, 11  # token of frames t … t+4, rows 2i … 2i+6, columns 2j … 2j+6
    patch = x[b, :, t : t + 5, 2 * i : 2 * i + 7, 2 * j : 2 * j + 7].reshape(-1)  # (c, t, h, w) order
    expected = (
        tok.norm_out(tok.proj(tok.norm_in(patch))) + tok.spatial_pos[0, 0, i * 29 + j] + tok.temporal_pos[0, t, 0]
    )
    torch.testing.assert_close(tokens[b, t, i * 29 + j], expected)
    # The fused (Conv3d) tokenizer computes the same function, values and gradients.
    tok.fused = False
    x = (x * 3 + 1).requires_grad_(True)  # off-centre inputs: the variance must not cancel badly
    literal = tok(x)
    (grad_literal,) = torch.autograd.grad(literal.square().sum(), [tok.proj.weight])
    tok.fused = True
    fused = tok(x)
    (grad_fused,) = torch.autograd.grad(fused.square().sum(), [tok.proj.weight])
    torch.testing.assert_close(fused, literal, rtol=1e-4, atol=1e-4)
    assert (grad_fused - grad_literal).abs().max() <= 1e-4 * grad_literal.abs().max()


def test_attention_equals_the_softmax_reference() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 11, 17, 48, generator=g) for _ in range(3))
    for scale in (48**-0.5, 0.3):
        reference = torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1) @ v
        torch.testing.assert_close(attention(q, k, v, scale), reference, rtol=1e-5, atol=1e-5)
    reference = torch.softmax(q @ k.transpose(-2, -1) * 0.3, dim=-1) @ v
    torch.testing.assert_close(attention(q, k, v, 0.3, dropout=0.5, training=False), reference, rtol=1e-5, atol=1e-5)
    torch.manual_seed(1)
    dropped = attention(q, k, v, 0.3, dropout=0.5, training=True)
    kept = dropped != 0
    assert 0.4 < kept.float().mean().item() < 0.6  # dropout on the attention output
    torch.testing.assert_close(dropped[kept], 2 * reference[kept], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("parallel", [True, False])
def test_model_responses_finite_positive_and_every_parameter_learns(parallel: bool) -> None:
    torch.manual_seed(0)
    core = ViViTCore(**{**SMALL, "parallel_attention": parallel, "drop_path": 0.1, "attention_dropout": 0.1})
    neurons = {"a": make_neurons(7, "a"), "b": make_neurons(5, "b", 1)}
    encoder = Encoder.build(core, ViViTGaussianReadout, neurons, MLPShifter, Exp(), frames=12).train()
    video, behavior, pupil = make_inputs()
    out = encoder(video, "a", behavior, pupil)
    assert out.shape == (2, 7, 8)
    assert torch.isfinite(out).all() and (out > 0).all()
    out.sum().backward()
    used = [(n, p) for n, p in encoder.named_parameters() if not n.startswith(("readouts.b.", "shifters.b."))]
    assert [n for n, p in used if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0] == []


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    # Dropout on: the recomputation must replay the same random masks.
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        opts = {**SMALL, "attention_dropout": 0.2, "ff_dropout": 0.2, "drop_path": 0.2, "patch_dropout": 0.2}
        core = ViViTCore(**opts, gradient_checkpointing=checkpointing).train()
        core(*make_inputs()).square().sum().backward()
        grads.append([p.grad for p in core.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_state_encoder_adds_behaviour_to_every_neurons_sampled_features() -> None:
    torch.manual_seed(0)
    info = make_neurons(9)
    vivit = ViViTGaussianReadout((6, 5, 7), info).eval()
    plain = GaussianReadout((6, 5, 7), info).eval()
    plain.load_state_dict({k: v for k, v in vivit.state_dict().items() if not k.startswith("state_encoder.")})
    with torch.no_grad():
        vivit.features.normal_()
    plain.features.data.copy_(vivit.features.data)
    features = torch.randn(2, 6, 3, 5, 7)
    shift = torch.randn(2, 3, 2) * 0.1
    behavior = torch.randn(2, 3, 4)
    out = vivit(features, shift, behavior)  # (B, N, T)
    states = vivit.state_encoder(behavior)  # (B, T, C)
    weights = vivit.features.view(6, 9)  # (C, N)
    expected = plain(features, shift) + torch.einsum("btc,cn->bnt", states, weights)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, vivit(features, shift, behavior + 1.0))
    assert vivit.bias is not None and torch.equal(vivit.bias, torch.as_tensor(info.mean_responses).float())
    assert vivit.sigma.abs().max() <= 1.0
    with pytest.raises(ValueError, match="behavior"):
        vivit(features, shift)


def _original_poisson_correlation(y_true: torch.Tensor, y_pred: torch.Tensor, ds_size: int, batch: int) -> torch.Tensor:
    """viv1t/criterions.py ``PoissonCorrelationLoss`` with ``metrics.correlation``, restated."""
    eps = torch.finfo(torch.float32).eps
    poisson = torch.sum((y_pred + eps) - (y_true + eps) * torch.log(y_pred + eps))
    t = y_true.transpose(1, 2).reshape(-1, y_true.shape[1])  # (b t) n
    p = y_pred.transpose(1, 2).reshape(-1, y_pred.shape[1])
    t = (t - t.mean(0, keepdim=True)) / (t.std(0, unbiased=False, keepdim=True) + eps)
    p = (p - p.mean(0, keepdim=True)) / (p.std(0, unbiased=False, keepdim=True) + eps)
    corr = (t * p).mean(0)
    return (poisson + 1000 * torch.sum(2.0 - (corr + 1.0))) * math.sqrt(ds_size / batch)


def test_poisson_correlation_loss_matches_the_original_and_respects_the_mask() -> None:
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(3, 6, 10, generator=g) + 0.1
    target = torch.rand(3, 6, 10, generator=g) * 2
    loss = PoissonCorrelationLoss()
    torch.testing.assert_close(loss(pred, target, None, 40), _original_poisson_correlation(target, pred, 40, 3))
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[:, :7] = True
    torch.testing.assert_close(loss(pred, target, mask, 40), loss(pred[..., :7], target[..., :7], None, 40))
    torch.testing.assert_close(loss(pred, target, None, 40, batch_size=6), loss(pred, target, None, 40) / math.sqrt(2))
    plain = PoissonCorrelationLoss(correlation_weight=0.0, scale_by_dataset=False)
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(plain(pred, target), ((pred + eps) - (target + eps) * torch.log(pred + eps)).sum())
    corr = loss.correlation(2 * target + 1, target)
    torch.testing.assert_close(corr, torch.ones(6), rtol=1e-5, atol=1e-5)
    pred.requires_grad_(True)
    loss(pred, target, mask, 40).backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and (pred.grad[..., 7:] == 0).all()
