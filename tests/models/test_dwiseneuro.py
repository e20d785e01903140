"""DwiseNeuro: parameter counts pinned to the original, input stacking, positional encoding, shortcuts, gradients,
readout grouping, init, the target ReLU of the loss, and a stage-1 → stage-2 (distillation) fit."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sensorium.data.batch import NeuronInfo
from lightning_sensorium.launch import run_lightning, with_experiment_defaults
from lightning_sensorium.losses import PoissonLoss
from lightning_sensorium.models.cores.dwiseneuro import (
    DepthwiseConv3d,
    DwiseNeuroCore,
    InvertedResidual3d,
    PositionalEncoding3d,
    ShuffleLayer,
    original_key,
    tile_channels,
)
from lightning_sensorium.models.encoder import Encoder
from lightning_sensorium.models.readouts.dwiseneuro import DwiseNeuroReadout
from tests.test_experiments import tiny_args

#: Neuron counts of the 10 mice the original trains on (5 new, then 5 old; models.md).
MICE_NEURONS = (7863, 7908, 8202, 7939, 8122, 7440, 7928, 8285, 7671, 7495)
#: A core that is cheap at the full 64×64 input: 3 blocks, 2 stride-2, a 2-layer cortex.
TINY = {
    "features": (4, 8, 8),
    "spatial_strides": (2, 1, 2),
    "expansion": 2,
    "se_reduction": 4,
    "cortex_features": (16, 32),
}


def neurons(n: int, mouse: str = "m") -> NeuronInfo:
    return NeuronInfo(mouse, np.arange(n), np.zeros((n, 3)), np.zeros(n))


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def make_inputs(batch: int = 2, frames: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    video = torch.rand(batch, 1, frames, 36, 64, generator=g) * 255  # raw grey levels
    return video, torch.randn(batch, 2, frames, generator=g), torch.randn(batch, 2, frames, generator=g)


def test_parameter_counts_match_the_original() -> None:
    with torch.device("meta"):  # no memory for the 170 M parameters
        core = DwiseNeuroCore()
        encoder = Encoder.build(
            core, DwiseNeuroReadout, {f"m{i}": neurons(n, f"m{i}") for i, n in enumerate(MICE_NEURONS)}
        )
        stage2 = DwiseNeuroCore(expansion=6)
    assert count(core) - count(core.cortex) == 3_673_404
    assert count(core.cortex) == 5_402_624
    assert count(core) == 9_076_028
    blocks = [count(b) for b in core.blocks if isinstance(b, InvertedResidual3d)]
    assert [round(b, -3) for b in blocks] == [80_000] * 3 + [108_000, 299_000, 299_000, 414_000] + [1_157_000] * 2
    assert count(encoder.readouts["m0"]) == 16_113_336  # 7864 × 2048 + 7864
    assert count(encoder) == 170_656_070
    assert count(stage2) - count(stage2.cortex) == 3_075_736
    assert count(stage2.cortex) == 5_402_624
    groups = encoder.parameter_groups()
    assert sum(p.numel() for p in groups["core"]) == 9_076_028


def test_output_shape_time_alignment_and_finite_positive_rates() -> None:
    assert DwiseNeuroCore().output_shape((1, 16, 36, 64)) == (4096, 16, 1, 1)
    core = DwiseNeuroCore(**TINY).eval()  # type: ignore[arg-type]
    video, behavior, pupil = make_inputs(frames=5)
    with torch.no_grad():
        out = core(video, behavior, pupil)
    assert out.shape == (2, 32, 5, 1, 1)
    assert core.output_shape((1, 5, 36, 64)) == tuple(out.shape[1:])
    assert core.lost_frames((1, 5, 36, 64)) == 0
    encoder = Encoder.build(core, DwiseNeuroReadout, {"a": neurons(7)}, output_activation=torch.nn.Softplus(0.07))
    with torch.no_grad():
        rates = encoder(video, "a", behavior, pupil)
    assert rates.shape == (2, 7, 5)
    # Softplus: never negative (an untrained BN in eval mode on raw 0–255 input drives some to underflow 0).
    assert torch.isfinite(rates).all() and (rates >= 0).all()
    # Trunk (before pooling): 64×64 padded input, strides 2 and 2 → 16×16.
    with torch.no_grad():
        assert core.trunk(core.inputs(video, behavior, pupil)).shape == (2, 8, 5, 16, 16)


def test_inputs_are_padded_to_64_and_signals_fill_the_whole_frame() -> None:
    core = DwiseNeuroCore(**TINY)  # type: ignore[arg-type]
    video, behavior, pupil = make_inputs(batch=1, frames=3)
    x = core.inputs(video, behavior, pupil)
    assert x.shape == (1, 5, 3, 64, 64)
    # src/inputs.py StackInputsProcessor: (64 − 36) // 2 = 14 zero rows above, 14 below, no column padding.
    assert torch.equal(x[:, 0, :, 14:50], video[:, 0])
    assert (x[:, 0, :, :14] == 0).all() and (x[:, 0, :, 50:] == 0).all()
    assert torch.equal(x[0, 1:3], behavior[0][..., None, None].expand(2, 3, 64, 64))  # padding rows included
    assert torch.equal(x[0, 3:5], pupil[0][..., None, None].expand(2, 3, 64, 64))
    odd = core.inputs(torch.ones(1, 1, 2, 35, 61), behavior[..., :2], pupil[..., :2])
    assert odd.shape == (1, 5, 2, 64, 64)
    assert odd[0, 0, 0].sum(1).nonzero().flatten().tolist() == list(range(14, 49))  # top (64 − 35) // 2
    assert odd[0, 0, 0].sum(0).nonzero().flatten().tolist() == list(range(1, 62))  # left (64 − 61) // 2
    unpadded = DwiseNeuroCore(**TINY, pad_to=None)  # type: ignore[arg-type]
    assert unpadded.inputs(video, behavior, pupil).shape == (1, 5, 3, 36, 64)
    with pytest.raises(ValueError, match="pad_to"):
        DwiseNeuroCore(**TINY, pad_to=(32, 64)).inputs(video, behavior, pupil)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pupil_center"):
        core(video, behavior)


def test_positional_encoding_matches_the_formula() -> None:
    channels, t, h, w = 20, 3, 4, 5
    pe = PositionalEncoding3d(channels)
    ch = math.ceil(channels / 6) * 2  # 8 channels per axis, frequencies 1 / 10000^(2k / 8), k < 4
    table = pe.encoding(t, h, w, torch.float32, torch.device("cpu"))[0]  # (C, t, h, w)
    assert table.shape == (channels, t, h, w)
    expected = torch.zeros(channels, t, h, w)
    for c in range(channels):
        axis, j = divmod(c, ch)
        k = j % (ch // 2)
        fn = math.sin if j < ch // 2 else math.cos
        for ti in range(t):
            for yi in range(h):
                for xi in range(w):
                    pos = (ti, yi, xi)[axis]
                    expected[c, ti, yi, xi] = fn(pos / 10000 ** (2 * k / ch))
    torch.testing.assert_close(table, expected, rtol=0, atol=1e-6)
    x = torch.randn(2, channels, t, h, w)
    torch.testing.assert_close(pe(x), x + expected)
    assert list(pe.parameters()) == [] and list(pe.buffers()) == [] and pe.state_dict() == {}
    assert pe(torch.zeros(1, channels, 2, 2, 2)).shape == (1, channels, 2, 2, 2)  # a new shape rebuilds the cache
    with pytest.raises(ValueError, match="PositionalEncoding3d"):
        pe(torch.zeros(1, channels + 1, 2, 2, 2))


def test_shortcut_is_nearest_downsampling_and_channel_tiling_plus_batchnorm_only() -> None:
    block = InvertedResidual3d(3, 8, spatial_stride=2, expansion=4, se_reduction=4).eval()
    shortcut_params = {n for n, _ in block.named_parameters() if not n.startswith(("conv_", "se."))}
    assert shortcut_params == {"norm_shortcut.weight", "norm_shortcut.bias"}
    with torch.no_grad():
        block.norm_shortcut.running_var.fill_(4.0)  # BN in eval: (x − 0) / sqrt(4 + eps)
        x = torch.randn(2, 3, 4, 7, 7)
        sc = block.shortcut(x)
    assert sc.shape == (2, 8, 4, 4, 4)  # ceil(7 / 2)
    # torch "nearest" 7 → 4 picks source index floor(i · 7/4): rows/columns 0, 1, 3, 5 (as in the original).
    pick = torch.tensor([0, 1, 3, 5])
    down = x[..., pick, :][..., pick]
    expected = torch.cat([down, down, down[:, :2]], dim=1) / math.sqrt(4.0 + 1e-5)  # channels 0 1 2 0 1 2 0 1
    torch.testing.assert_close(sc, expected)
    torch.testing.assert_close(tile_channels(torch.arange(3.0).view(1, 3), 7), torch.tensor([[0.0, 1, 2, 0, 1, 2, 0]]))
    identity = InvertedResidual3d(8, 8, expansion=1, se_reduction=4)
    assert hasattr(identity, "norm_shortcut")  # the BN is kept even on an identity path, as the original
    layer = ShuffleLayer(4, 8, groups=2)
    assert {n for n, _ in layer.named_parameters() if "shortcut" in n} == {"norm_shortcut.weight", "norm_shortcut.bias"}


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "bias"),
    [
        ((1, 3, 3), (1, 1, 1), (0, 1, 1), False),
        ((1, 3, 3), (1, 2, 2), (0, 1, 1), True),
        ((5, 1, 1), 1, (2, 0, 0), True),
    ],
)
def test_depthwise_conv3d_runs_2d_and_equals_the_3d_convolution(
    kernel: tuple[int, int, int],
    stride: tuple[int, int, int] | int,
    padding: tuple[int, int, int],
    bias: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Same outputs and gradients (input, weight, bias) as ``nn.Conv3d`` with the same parameters, and the same
    state dict (odd frame counts and widths would catch a wrong view)."""
    torch.manual_seed(0)
    ours = DepthwiseConv3d(6, 6, kernel, stride=stride, padding=padding, groups=6, bias=bias)
    plain = nn.Conv3d(6, 6, kernel, stride=stride, padding=padding, groups=6, bias=bias)
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(2, 6, 7, 9, 11, requires_grad=True)
    y_plain = plain(x)

    def no_3d(*args: object, **kwargs: object) -> None:
        raise AssertionError("DepthwiseConv3d fell back to the 3D convolution")

    monkeypatch.setattr(F, "conv3d", no_3d)
    y_ours = ours(x)
    torch.testing.assert_close(y_ours, y_plain)
    params = [x, ours.weight] + ([ours.bias] if bias else [])
    plain_params = [x, plain.weight] + ([plain.bias] if bias else [])
    grads_ours = torch.autograd.grad(y_ours.square().sum(), params)
    grads_plain = torch.autograd.grad(y_plain.square().sum(), plain_params)
    for a, b in zip(grads_ours, grads_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_channel_shuffle_interleaves_the_groups() -> None:
    layer = ShuffleLayer(4, 8, groups=2)
    x = torch.arange(8.0).view(1, 8, 1)  # group 0: channels 0–3, group 1: 4–7
    assert layer.shuffle(x).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_every_parameter_gets_a_gradient_and_drop_path_rates_rise() -> None:
    torch.manual_seed(0)
    core = DwiseNeuroCore(**TINY)  # type: ignore[arg-type]
    encoder = Encoder.build(core, DwiseNeuroReadout, {"a": neurons(9), "b": neurons(4, "b")}).train()
    video, behavior, pupil = make_inputs(batch=4, frames=4)
    out = encoder(video, "a", behavior, pupil)
    assert torch.isfinite(out).all()
    out.sum().backward()
    used = [(n, p) for n, p in encoder.named_parameters() if not n.startswith("readouts.b.")]
    assert [n for n, p in used if p.grad is None or not torch.isfinite(p.grad).all()] == []
    assert [n for n, p in used if p.grad.abs().sum() == 0] == []  # type: ignore[union-attr]
    assert all(p.grad is None for n, p in encoder.named_parameters() if n.startswith("readouts.b."))
    rates = [b.drop_path.drop_prob for b in DwiseNeuroCore().blocks if isinstance(b, InvertedResidual3d)]
    assert rates == pytest.approx([0.1 * i / 9 for i in range(9)])
    assert [layer.drop_path.drop_prob for layer in DwiseNeuroCore().cortex] == [0.1] * 3  # type: ignore[union-attr]


def test_init_follows_the_original() -> None:
    torch.manual_seed(0)
    core = DwiseNeuroCore()
    block = core.blocks[15]  # InvertedResidual3d 7: 256 → 256, mid 1792
    assert isinstance(block, InvertedResidual3d)
    pw = block.conv_pw[0].weight  # fan_out = 1792
    assert pw.std().item() == pytest.approx(math.sqrt(2 / 1792), rel=0.02)
    dw = block.conv_spatial[0].weight  # depthwise: fan_out = 9 · 1792 / 1792
    assert dw.std().item() == pytest.approx(math.sqrt(2 / 9), rel=0.05)
    assert torch.equal(block.se.conv_reduce.bias, torch.zeros(56))
    assert all(
        torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
        for m in core.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    )
    readout = DwiseNeuroReadout((4096, 1, 1), neurons(7863))
    assert readout.conv.out_channels == 7864
    assert readout.conv.weight.std().item() == pytest.approx(math.sqrt(2 / 3932), rel=0.02)
    assert torch.equal(readout.conv.bias, torch.zeros(7864))  # type: ignore[arg-type]


def test_readout_halves_read_their_own_channel_group_and_dropout_drops_channels() -> None:
    readout = DwiseNeuroReadout((8, 1, 1), neurons(5)).eval()  # 6 outputs: 0–2 read channels 0–3, 3–5 read 4–7
    x = torch.randn(1, 8, 3, 1, 1)
    out = readout(x)
    assert out.shape == (1, 5, 3)
    changed = x.clone()
    changed[:, 7] += 1.0
    diff = (readout(changed) - out).abs().amax(dim=(0, 2))
    assert (diff[:3] == 0).all() and (diff[3:] > 0).all()
    readout.train()
    ones = torch.ones(64, 8, 3, 1, 1)
    dropped = torch.nn.Dropout1d(0.4)
    torch.manual_seed(0)
    a = readout(ones)
    torch.manual_seed(0)
    b = readout.conv(dropped(ones.flatten(2)))[:, :5]
    torch.testing.assert_close(a, b)  # whole (sample, channel) rows dropped, for all frames at once
    with pytest.raises(ValueError, match="pooled"):
        DwiseNeuroReadout((8, 2, 2), neurons(5))
    with pytest.raises(ValueError, match="groups"):
        DwiseNeuroReadout((7, 1, 1), neurons(5))


def test_original_keys_cover_the_original_state_dict_names() -> None:
    core = DwiseNeuroCore(**TINY)  # type: ignore[arg-type]
    keys = {original_key(k) for k in core.state_dict()}
    assert "core.stem.0.weight" in keys and "core.stem.1.bn.running_var" in keys
    assert "core.blocks.1.spat_covn_dw.0.weight" in keys and "core.blocks.5.temp_covn_dw.1.bn.bias" in keys
    assert "core.blocks.1.se.conv_reduce.bias" in keys and "core.blocks.3.bn_sc.bn.weight" in keys
    assert "cortex.layers.1.bn.bn.num_batches_tracked" in keys and "cortex.layers.0.bn_sc.bn.weight" in keys
    assert len(keys) == len(core.state_dict())


def test_poisson_loss_can_relu_the_targets() -> None:
    pred = torch.rand(2, 3, 4) + 0.1
    target = torch.randn(2, 3, 4)
    relu = PoissonLoss(reduction="sample_mean", scale_by_dataset=False, clamp_target_min=0.0)
    plain = PoissonLoss(reduction="sample_mean", scale_by_dataset=False)
    torch.testing.assert_close(relu(pred, target), plain(pred, target.clamp(min=0)))
    assert not torch.allclose(plain(pred, target), relu(pred, target))
    expected = F.poisson_nll_loss(pred, target.relu(), log_input=False, eps=1e-8, reduction="none").sum() / 2
    torch.testing.assert_close(relu(pred, target), expected)  # MicePoissonLoss of one mouse


def _fit(config: str, tiny_stores: Path, tmp_path: Path, *extra: str) -> object:
    args = with_experiment_defaults(
        [
            "fit",
            *tiny_args(config, tiny_stores, tmp_path),
            "--trainer.fast_dev_run",
            "true",
            "--trainer.accelerator",
            "cpu",
            "--data.batch_size",
            "4",
            "--data.eval_batch_size",
            "2",
            *extra,
        ]
    )
    return run_lightning(args)


def test_distillation_fit(tiny_stores: Path, tmp_path: Path) -> None:
    """Stage 1 fits and saves; stage 2 fits with that checkpoint as its teacher."""
    stage1 = _fit("dwiseneuro.yaml", tiny_stores, tmp_path)
    ckpt = tmp_path / "stage1.ckpt"
    stage1.trainer.save_checkpoint(ckpt)  # type: ignore[attr-defined]
    stage2 = _fit("dwiseneuro_distill.yaml", tiny_stores, tmp_path, "--model.teachers", f"[{ckpt}]")
    assert stage2.trainer.state.finished  # type: ignore[attr-defined]
    teachers = stage2.model._teachers  # type: ignore[attr-defined]
    assert len(teachers) == 1 and not teachers[0].training
    assert all(not p.requires_grad for p in teachers[0].parameters())
    assert stage2.model.encoder.core.blocks[1].conv_pw[0].out_channels == 4 * 2  # type: ignore[attr-defined]
