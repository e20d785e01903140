"""EMA and CutMix callbacks: exact mixing and averaging, checkpoint/resume, bf16-mixed, and a 2-process ddp_fork fit."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, Timer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sensorium.callbacks import EMA, BudgetDecay, CutMix, PlateauRestore
from lightning_sensorium.callbacks.cutmix import cutmix_batch, rand_box
from lightning_sensorium.launch import run_lightning, with_experiment_defaults
from tests.test_training import FAST as TRAINING_FAST

ROOT = Path(__file__).parents[1]
EXPERIMENTS = ROOT / "experiments"
H, W = 36, 64


# ---------------------------------------------------------------------------------------------------------- CutMix
def _batch(mice: list[str] | str, b: int, neurons: dict[str, int] | None = None, t: int = 3) -> dict[str, Any]:
    """Sample i has video ≡ i + 1 (so pasted pixels name their source), random targets and behaviour."""
    g = torch.Generator().manual_seed(0)
    batch: dict[str, Any] = {
        "video": (torch.arange(b, dtype=torch.float32) + 1).view(b, 1, 1, 1, 1).expand(b, 1, t, H, W).clone(),
        "behavior": torch.rand(b, 2, t, generator=g),
        "pupil_center": torch.rand(b, 2, t, generator=g),
        "mouse_id": mice,
    }
    if isinstance(mice, str):
        batch["responses"] = torch.rand(b, 5, t, generator=g)  # (B, N, T)
    else:
        assert neurons is not None
        batch["responses"] = [torch.rand(neurons[m], t, generator=g) for m in mice]  # B × (N_mouse, T)
    return batch


def _check_mix(before: dict[str, Any], after: dict[str, Any], mix_behavior: bool = True) -> list[float]:
    """Recover each sample's partner and box from the video; check the targets are mixed by that exact area."""
    fractions = []
    b = before["video"].shape[0]
    for i in range(b):
        v = after["video"][i]  # (1, T, H, W)
        pasted = v != i + 1
        # Same box in every frame and channel, a rectangle, all from one partner.
        assert torch.equal(pasted, pasted[:1, :1].expand_as(pasted))
        box = pasted[0, 0]
        rows, cols = box.any(1), box.any(0)
        assert torch.equal(box, rows[:, None] & cols[None, :])
        frac = float(box.sum()) / (H * W)
        assert frac == pytest.approx(float(after["cutmix_fraction"][i]), abs=1e-12)
        j = int(after["cutmix_partner"][i])
        if frac == 0:
            assert j == -1
            assert torch.equal(after["responses"][i], before["responses"][i])
            fractions.append(0.0)
            continue
        assert j != i and bool((v[pasted] == j + 1).all())
        expected = (1 - frac) * before["responses"][i] + frac * before["responses"][j]
        torch.testing.assert_close(after["responses"][i], expected, rtol=1e-6, atol=1e-7)
        for key in ("behavior", "pupil_center"):
            want = (1 - frac) * before[key][i] + frac * before[key][j] if mix_behavior else before[key][i]
            torch.testing.assert_close(after[key][i], want, rtol=1e-6, atol=1e-7)
        fractions.append(frac)
    return fractions


def _clone(batch: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.clone()
        elif isinstance(v, list):
            out[k] = [x.clone() if isinstance(x, torch.Tensor) else x for x in v]
        else:
            out[k] = v
    return out


@pytest.mark.parametrize("mix_behavior", [True, False])
def test_cutmix_mixes_targets_by_pasted_area(mix_behavior: bool) -> None:
    before = _batch("m", 8)
    after = cutmix_batch(_clone(before), np.random.default_rng(3), alpha=1.0, prob=1.0, mix_behavior=mix_behavior)
    assert after["video"].shape == before["video"].shape and after["responses"].shape == before["responses"].shape
    fractions = _check_mix(before, after, mix_behavior)
    assert sum(f > 0 for f in fractions) >= 6  # prob 1: nearly every sample mixed (a box can clip to nothing)


def test_cutmix_prob_zero_and_one() -> None:
    before = _batch("m", 6)
    untouched = cutmix_batch(_clone(before), np.random.default_rng(0), prob=0.0)
    assert torch.equal(untouched["video"], before["video"]) and torch.equal(untouched["responses"], before["responses"])
    mixed = [cutmix_batch(_clone(before), np.random.default_rng(s), prob=0.5) for s in range(40)]
    share = np.mean([float((m["cutmix_partner"] >= 0).float().mean()) for m in mixed])
    assert 0.35 < share < 0.6


def test_box_inside_non_square_frame() -> None:
    rng = np.random.default_rng(0)
    widths, heights = [], []
    for lam in rng.uniform(0, 1, 2000):
        y1, y2, x1, x2 = rand_box(H, W, float(lam), rng)
        assert 0 <= y1 <= y2 <= H and 0 <= x1 <= x2 <= W
        assert y2 - y1 <= int(H * np.sqrt(lam)) and x2 - x1 <= int(W * np.sqrt(lam))
        widths.append(x2 - x1)
        heights.append(y2 - y1)
    # Each side is drawn on its own axis: boxes wider than the frame is tall exist (the original's swap forbids them).
    assert max(widths) > H and max(heights) <= H

    # A box centred in the frame has the intended sides.
    class Centre:
        def integers(self, n: int) -> int:
            return n // 2

    y1, y2, x1, x2 = rand_box(H, W, 0.25, Centre())  # type: ignore[arg-type]
    assert (y1, y2, x1, x2) == (9, 27, 16, 48)


def test_mixed_batch_partners_are_the_same_mouse() -> None:
    mice = ["a", "b", "a", "b", "a", "c", "b", "a"]
    neurons = {"a": 3, "b": 5, "c": 2}
    before = _batch(mice, len(mice), neurons)
    for seed in range(5):
        after = cutmix_batch(_clone(before), np.random.default_rng(seed), prob=1.0)
        assert [r.shape for r in after["responses"]] == [r.shape for r in before["responses"]]
        _check_mix(before, after)
        for i, j in enumerate(after["cutmix_partner"].tolist()):
            if j >= 0:
                assert mice[j] == mice[i]
        assert int(after["cutmix_partner"][5]) == -1  # the only sample of mouse c stays itself


def test_cutmix_mixes_responses_on_one_scale_with_a_response_scale() -> None:
    """With ``response_scale`` the targets are mixed as ``s_i · ((1 − f) y_i / s_i + f y_j / s_j)``: on each
    neuron's one scale, then given the receiving sample's per-frame gain (one-mouse and mixed-mouse batches)."""
    for mice, neurons in (("m", None), (["a", "b", "a", "b", "a", "a"], {"a": 3, "b": 5})):
        before = _batch(mice, 6, neurons) if neurons else _batch(mice, 6)
        g = torch.Generator().manual_seed(1)
        if isinstance(before["responses"], torch.Tensor):
            before["response_scale"] = 0.5 + torch.rand(before["responses"].shape, generator=g)
        else:
            before["response_scale"] = [0.5 + torch.rand(r.shape, generator=g) for r in before["responses"]]
        after = cutmix_batch(_clone(before), np.random.default_rng(2), prob=1.0)
        for i, j in enumerate(after["cutmix_partner"].tolist()):
            f = float(after["cutmix_fraction"][i])
            y, s = before["responses"], before["response_scale"]
            want = y[i] if j < 0 else s[i] * ((1 - f) * y[i] / s[i] + f * y[j] / s[j])
            torch.testing.assert_close(after["responses"][i], want, rtol=1e-5, atol=1e-6)
        assert (after["cutmix_partner"] >= 0).sum() >= 2


def test_cutmix_is_deterministic() -> None:
    cb = CutMix(prob=1.0, seed=7)
    before = _batch("m", 6)
    one = cutmix_batch(_clone(before), cb.generator(global_step=4, batch_idx=9, rank=0), prob=1.0)
    two = cutmix_batch(_clone(before), cb.generator(global_step=4, batch_idx=9, rank=0), prob=1.0)
    other = cutmix_batch(_clone(before), cb.generator(global_step=4, batch_idx=10, rank=0), prob=1.0)
    rank1 = cutmix_batch(_clone(before), cb.generator(global_step=4, batch_idx=9, rank=1), prob=1.0)
    assert torch.equal(one["video"], two["video"]) and torch.equal(one["responses"], two["responses"])
    assert not torch.equal(one["video"], other["video"]) and not torch.equal(one["video"], rank1["video"])
    with pytest.raises(ValueError, match="prob"):
        CutMix(prob=1.5)
    with pytest.raises(ValueError, match="alpha"):
        CutMix(alpha=0.0)


class FreshWindows:
    """A stand-in for the data module's windows: the k-th window read has video ≡ 100 + k and trial k; it records
    the mouse each was read for."""

    def __init__(self, neurons: dict[str, int], t: int = 3) -> None:
        self.neurons, self.t = neurons, t
        self.read: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, mouse: str, rng: np.random.Generator) -> dict[str, Any]:
        k = len(self.read)
        g = torch.Generator().manual_seed(100 + k)
        sample = {
            "mouse_id": mouse,
            "trial": k,
            "video": torch.full((1, self.t, H, W), 100.0 + k),  # (1, T, H, W)
            "behavior": torch.rand(2, self.t, generator=g),
            "pupil_center": torch.rand(2, self.t, generator=g),
            "responses": torch.rand(self.neurons[mouse], self.t, generator=g) - 0.3,  # some below 0
        }
        self.read.append((mouse, sample))
        return sample


def test_cutmix_box_on_the_padded_canvas() -> None:
    """DwiseNeuro draws the box on its 64 × 64 zero-padded input (rows 14–49 hold the 36 frame rows): the pasted
    pixels are the box's part on the frame, the targets are mixed by the box's share of the canvas."""
    canvas_rows = set()
    padding_only = 0
    for seed in range(30):
        before = _batch("m", 8)
        source = FreshWindows({"m": 5})
        after = cutmix_batch(
            _clone(before), np.random.default_rng(seed), prob=1.0, canvas=(64, 64), fresh_window=source
        )
        trials = after["cutmix_partner_trial"].tolist()
        for i in range(8):
            y1, y2, x1, x2 = after["cutmix_box"][i].tolist()
            assert 0 <= y1 <= y2 <= 64 and 0 <= x1 <= x2 <= 64
            frac = (y2 - y1) * (x2 - x1) / 64**2
            assert float(after["cutmix_fraction"][i]) == pytest.approx(frac)
            pasted = after["video"][i, 0, 0] != i + 1  # (H, W)
            fy1, fy2 = min(max(y1 - 14, 0), H), min(max(y2 - 14, 0), H)
            want = torch.zeros(H, W, dtype=torch.bool)
            want[fy1:fy2, x1:x2] = True
            assert torch.equal(pasted, want)
            if frac == 0:
                assert trials[i] == -1 and torch.equal(after["responses"][i], before["responses"][i])
                continue
            partner = source.read[trials[i]][1]
            assert bool((after["video"][i][:, :, want] == partner["video"][:, :, want]).all())
            canvas_rows.update((y1, y2))
            padding_only += int(frac > 0 and not want.any())
    assert min(canvas_rows) < 14 and max(canvas_rows) > 50  # boxes reach into the padding above and below
    assert padding_only > 0  # a box wholly in the padding pastes nothing and still mixes the targets


def test_cutmix_fresh_partners_mix_every_sample_with_its_own_mouse() -> None:
    """Partners are fresh windows of the same mouse, so every sample can be mixed (the only sample of mouse c
    too); targets, behaviour and pupil centre are mixed by the box's area, the targets ReLU'd first."""
    mice = ["a", "b", "a", "b", "a", "c", "b", "a"]
    neurons = {"a": 3, "b": 5, "c": 2}
    mixed_c = 0
    for seed in range(10):
        before = _batch(mice, len(mice), neurons)
        source = FreshWindows(neurons)
        after = cutmix_batch(
            _clone(before),
            np.random.default_rng(seed),
            prob=1.0,
            canvas=(64, 64),
            fresh_window=source,
            clamp_responses_min=0.0,
        )
        fractions = after["cutmix_fraction"].tolist()
        trials = after["cutmix_partner_trial"].tolist()
        assert (after["cutmix_partner"] == -1).all()  # no partner in the batch
        assert [k for k in trials if k >= 0] == list(range(len(source.read)))  # one fresh window per mixed sample
        for i, (f, k) in enumerate(zip(fractions, trials, strict=True)):
            assert (k >= 0) == (f > 0)
            own = before["responses"][i].clamp(min=0)
            if f == 0:
                torch.testing.assert_close(after["responses"][i], own)
                continue
            mouse, partner = source.read[k]
            assert mouse == mice[i]
            want = (1 - f) * own + f * partner["responses"].clamp(min=0)
            torch.testing.assert_close(after["responses"][i], want, rtol=1e-6, atol=1e-7)
            for key in ("behavior", "pupil_center"):
                torch.testing.assert_close(after[key][i], (1 - f) * before[key][i] + f * partner[key])
            mixed_c += int(mice[i] == "c")
        assert sum(f > 0 for f in fractions) >= 6  # prob 1: nearly all (a box can be too thin to hold a pixel)
    assert mixed_c >= 5
    # prob 0.5: about half the samples, each with a fresh window; the same draws give the same mix.
    share = np.mean(
        [
            float(
                (
                    cutmix_batch(_batch("m", 8), np.random.default_rng(s), fresh_window=FreshWindows({"m": 5}))[
                        "cutmix_fraction"
                    ]
                    > 0
                )
                .float()
                .mean()
            )
            for s in range(40)
        ]
    )
    assert 0.35 < share < 0.6
    one, two = (
        cutmix_batch(_batch(mice, 8, neurons), np.random.default_rng(3), fresh_window=FreshWindows(neurons))
        for _ in range(2)
    )
    assert torch.equal(one["video"], two["video"]) and torch.equal(one["cutmix_box"], two["cutmix_box"])


def test_cutmix_reads_fresh_windows_through_the_data_module(tiny_stores: Path) -> None:
    """``partner: fresh_window`` reads a training window of the same mouse from the trainer's data module."""
    from types import SimpleNamespace

    from lightning_sensorium.data.datamodule import SensoriumDataModule

    dm = SensoriumDataModule(root=str(tiny_stores), frames=8, batch_size=6, batch_mode="mixed")
    batch = next(iter(dm.train_dataloader()))
    cb = CutMix(prob=1.0, seed=1, partner="fresh_window", canvas=(64, 64))
    source = cb.window_source(SimpleNamespace(datamodule=dm))  # type: ignore[arg-type]
    assert source is not None
    read: list[tuple[str, dict[str, Any]]] = []
    before = _clone(batch)
    after = cutmix_batch(
        batch,
        cb.generator(0, 0, 0),
        prob=1.0,
        canvas=(64, 64),
        fresh_window=lambda m, r: read.append((m, source(m, r))) or read[-1][1],
    )
    k = 0
    for i, trial in enumerate(after["cutmix_partner_trial"].tolist()):
        if trial < 0:
            continue
        mouse, sample = read[k]
        k += 1
        assert mouse == before["mouse_id"][i] and sample["trial"] == trial
        assert trial in dm._train_trials[mouse]
        assert sample["video"].shape == before["video"][i].shape
        pasted = after["video"][i] != before["video"][i]
        assert bool((after["video"][i][pasted] == sample["video"][pasted]).all())
    assert k == len(read) >= 4
    with pytest.raises(TypeError, match="SensoriumDataModule"):
        cb.window_source(SimpleNamespace(datamodule=None))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="larger than the canvas"):
        cutmix_batch(_batch("m", 2), np.random.default_rng(0), canvas=(32, 64))


# ------------------------------------------------------------------------------------------------------------- EMA
class Toy(L.LightningModule):
    """Linear → BatchNorm → Linear regression; records the weights every validation step sees."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
        self.seen_in_validation: list[tuple[int, dict[str, torch.Tensor]]] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        if batch_idx == 0:
            self.seen_in_validation.append((self.global_step, _state(self)))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class Trajectory(Callback):
    """Raw weights at fit start and after every optimizer step, keyed by global step."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}
        self.at_train_start: dict[str, torch.Tensor] = {}
        self.ema_at_train_start: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.states[trainer.global_step] = _state(pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.at_train_start = _state(pl_module)
        ema = next(c for c in trainer.callbacks if isinstance(c, EMA))
        assert ema.average_model is not None
        self.ema_at_train_start = _state(ema.average_model.module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.states[trainer.global_step] = _state(pl_module)


def _hand_ema(states: dict[int, dict[str, torch.Tensor]], decay: float, start: dict[str, torch.Tensor] | None = None):
    """EMA of the raw trajectory: e₀ = w₀ (or ``start``), eₖ = decay·eₖ₋₁ + (1 − decay)·wₖ; integers follow wₖ."""
    steps = sorted(states)
    e = {k: v.clone() for k, v in (start or states[steps[0]]).items()}
    out = {steps[0]: {k: v.clone() for k, v in e.items()}}
    for s in steps[1:]:
        for k, w in states[s].items():
            e[k] = decay * e[k] + (1 - decay) * w if w.is_floating_point() else w.clone()
        out[s] = {k: v.clone() for k, v in e.items()}
    return out


def _assert_state_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], close: bool = True) -> None:
    floats = [k for k in a if a[k].is_floating_point()]
    same = all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6, rtol=1e-5) for k in floats)
    assert same == close, {k: float((a[k].float() - b[k].float()).abs().max()) for k in floats}


def _toy_trainer(tmp_path: Path, *callbacks: Callback, **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "max_epochs": 1,
        "limit_train_batches": 6,
        "val_check_interval": 3,
        "limit_val_batches": 1,
        "num_sanity_val_steps": 0,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": str(tmp_path),
    }
    options.update(kwargs)
    return L.Trainer(callbacks=list(callbacks), **options)


def _toy_data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1 * torch.randn(48, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_ema_matches_hand_computed_average(tmp_path: Path, precision: str) -> None:
    torch.manual_seed(0)
    model, decay = Toy(), 0.6
    trajectory, ema = Trajectory(), EMA(decay=decay)
    _toy_trainer(tmp_path, ema, trajectory, precision=precision).fit(model, _toy_data(), _toy_data())
    expected = _hand_ema(trajectory.states, decay)
    assert sorted(expected) == list(range(7))
    # Validation ran on the average at steps 3 and 6, not on the raw weights.
    assert [s for s, _ in model.seen_in_validation] == [3, 6]
    for step, seen in model.seen_in_validation:
        _assert_state_close(seen, expected[step])
        _assert_state_close(seen, trajectory.states[step], close=False)
    # BatchNorm running statistics are averaged too; the counter follows the raw model.
    assert not torch.allclose(expected[6]["net.1.running_mean"], trajectory.states[6]["net.1.running_mean"])
    assert int(ema.average_model.module.state_dict()["net.1.num_batches_tracked"]) == 6
    # After fit the module holds the average.
    _assert_state_close(_state(model), expected[6])


def test_ema_schedule_pickling_and_errors() -> None:
    ema = EMA(start_step=2, update_every_n_steps=3)
    assert [s for s in range(10) if ema.should_update(step_idx=s)] == [2, 5, 8]
    assert not ema.should_update(epoch_idx=0)
    # Picklable (ddp_spawn pickles the callbacks): no closures.
    restored = pickle.loads(pickle.dumps(EMA(decay=0.9)))
    assert restored.decay == 0.9 and pickle.loads(pickle.dumps(CutMix(alpha=0.5))).alpha == 0.5
    for bad in ({"decay": 1.5}, {"start_step": -1}, {"update_every_n_steps": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            EMA(**bad)


def test_ema_checkpoint_holds_both_and_resume_restores_both(tmp_path: Path) -> None:
    torch.manual_seed(0)
    decay = 0.7
    first = Trajectory()
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _toy_trainer(tmp_path, EMA(decay=decay), first, ckpt_cb, enable_checkpointing=True).fit(
        Toy(), _toy_data(), _toy_data()
    )
    expected = _hand_ema(first.states, decay)
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    _assert_state_close(ckpt["state_dict"], expected[6])
    _assert_state_close(ckpt["current_model_state"], first.states[6])
    _assert_state_close(ckpt["state_dict"], ckpt["current_model_state"], close=False)

    # Resume into a differently initialised module: both copies come back, and the average continues.
    torch.manual_seed(123)
    second, model = Trajectory(), Toy()
    _toy_trainer(tmp_path, EMA(decay=decay), second, max_epochs=2).fit(
        model, _toy_data(), _toy_data(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    _assert_state_close(second.at_train_start, first.states[6])
    _assert_state_close(second.ema_at_train_start, expected[6])
    continued = _hand_ema(second.states, decay, start=expected[6])
    assert max(continued) == 12
    _assert_state_close(_state(model), continued[12])

    # validate with the checkpoint (outside fit): the averaged `state_dict` is what is evaluated.
    model = Toy()
    trainer = _toy_trainer(tmp_path, EMA(decay=decay))
    trainer.validate(model, _toy_data(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    _assert_state_close(model.seen_in_validation[-1][1], expected[6])


# ---------------------------------------------------------------------------------------------------- full stack
#: tests/test_training.py's shrunken fit (each test here sets its own limit_train_batches), quieter and smaller.
FAST = [
    *TRAINING_FAST,
    "--trainer.enable_model_summary",
    "false",
    "--model.core.init_args.hidden_channels",
    "[4, 4, 4]",
    "--model.log_figures",
    "false",
]


class BatchProbe(Callback):
    """Records the CutMix fractions of training batches as the module receives them."""

    def __init__(self) -> None:
        self.fractions: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int):
        self.fractions += batch["cutmix_fraction"].tolist()


class DumpAverage(Callback):
    """Writes this rank's averaged and raw weights to ``<folder>/rank<r>.pt`` after each training batch.

    After training batches, not after validation: a DDP validation forward broadcasts rank 0's buffers into the
    module while it holds the averaged weights, which would equalise the averaged buffers and hide a missing sync.
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        ema = next(c for c in trainer.callbacks if isinstance(c, EMA))
        assert ema.average_model is not None
        state = {"ema": _state(ema.average_model.module), "raw": _state(pl_module), "step": trainer.global_step}
        torch.save(state, Path(self.folder) / f"rank{trainer.global_rank}.pt")


def _callbacks_config(tmp_path: Path) -> Path:
    """A config file adding EMA (decay 0.5) and CutMix (prob 1) to the experiment's callbacks, as a user would."""
    callbacks = [
        {"class_path": "lightning_sensorium.callbacks.EMA", "init_args": {"decay": 0.5}},
        {"class_path": "lightning_sensorium.callbacks.CutMix", "init_args": {"alpha": 1.0, "prob": 1.0}},
    ]
    path = tmp_path / "callbacks.yaml"
    path.write_text(json.dumps({"trainer": {"callbacks+": callbacks}}))
    return path


def _args(tmp_path: Path, stores: Path, *extra: str) -> list[str]:
    return with_experiment_defaults(
        [
            "fit",
            "--config",
            str(EXPERIMENTS / "factorized.yaml"),
            "--config",
            str(_callbacks_config(tmp_path)),
            "--data.root",
            str(stores),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path / "runs"),
            *FAST,
            *extra,
        ]
    )


def test_factorized_bf16_fit_with_ema_and_cutmix(tiny_stores: Path, tmp_path: Path) -> None:
    probe_config = json.dumps({"class_path": "tests.test_callbacks.BatchProbe"})
    extra = ["--trainer.precision", "bf16-mixed", "--trainer.limit_train_batches", "4"]
    cli = run_lightning(_args(tmp_path, tiny_stores, *extra, "--trainer.callbacks+", probe_config))
    probe = next(c for c in cli.trainer.callbacks if isinstance(c, BatchProbe))
    assert any(isinstance(c, EMA) for c in cli.trainer.callbacks)
    assert len(probe.fractions) == 8 and sum(f > 0 for f in probe.fractions) >= 4  # the module saw mixed batches
    assert torch.isfinite(cli.trainer.callback_metrics["val/single_trial_corr"])
    ckpt = torch.load(cli.trainer.checkpoint_callback.last_model_path, weights_only=False)
    assert ckpt["global_step"] == 2 and int(ckpt["averaging_state"]["n_averaged"]) == 3
    ema, raw = ckpt["state_dict"], ckpt["current_model_state"]
    assert set(ema) == set(raw)
    assert any(not torch.equal(ema[k], raw[k]) for k in raw if raw[k].is_floating_point())


_DDP_SCRIPT = """
import json, sys
from lightning_sensorium.launch import run_lightning
run_lightning(json.loads(sys.argv[1]))
"""


def test_ddp_fork_ranks_hold_identical_averages(tiny_stores: Path, tmp_path: Path) -> None:
    dump = tmp_path / "dump"
    dump.mkdir()
    args = _args(
        tmp_path,
        tiny_stores,
        # Plain ddp_fork: each per-mouse batch leaves the other mice's readouts unused, and the module switches on
        # DDP's unused-parameter detection itself (SensoriumModule.setup).
        "--trainer.strategy",
        "ddp_fork",
        "--trainer.devices",
        "2",
        "--trainer.limit_train_batches",
        "4",
        "--trainer.callbacks+",
        json.dumps({"class_path": "tests.test_callbacks.DumpAverage", "init_args": {"folder": str(dump)}}),
    )
    # A fresh interpreter: forking this one (threads started, env vars set by the launcher) is not safe.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", _DDP_SCRIPT, json.dumps(args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == 2  # 4 batches per rank, one step per cycle of the 2 mice
    assert ranks[0]["ema"].keys() == ranks[1]["ema"].keys()
    for k, v in ranks[0]["ema"].items():
        assert torch.equal(v, ranks[1]["ema"][k]), k  # parameters and BatchNorm statistics alike
    params = [k for k, v in ranks[0]["raw"].items() if "running" not in k and v.is_floating_point()]
    assert all(torch.equal(ranks[0]["raw"][k], ranks[1]["raw"][k]) for k in params)
    assert any(not torch.equal(ranks[0]["raw"][k], ranks[0]["ema"][k]) for k in params)


# ------------------------------------------------------------------------------------------------- PlateauRestore
def _plateau_run(values: list[float], **kwargs: Any) -> tuple[list[float], list[float], bool, PlateauRestore]:
    """Feed ``values`` as successive validation results; the weight is set to each epoch's value before it is
    validated, so a restore is visible. Returns (lr after each epoch, weight after each epoch, stopped, callback)."""
    from types import SimpleNamespace

    module = nn.Linear(1, 1, bias=False)
    optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
    trainer = SimpleNamespace(sanity_checking=False, callback_metrics={}, optimizers=[optimizer], should_stop=False)
    cb = PlateauRestore(patience=2, factor=0.5, min_lr=1e-3, **kwargs)
    lrs, weights = [], []
    for v in values:
        if trainer.should_stop:
            break
        with torch.no_grad():
            module.weight.fill_(v)
        trainer.callback_metrics = {"val/single_trial_corr": torch.tensor(v)}
        cb.on_validation_end(trainer, module)  # type: ignore[arg-type]
        lrs.append(optimizer.param_groups[0]["lr"])
        weights.append(float(module.weight))
    return lrs, weights, trainer.should_stop, cb


def test_plateau_restore_decays_restores_and_stops() -> None:
    lrs, weights, stopped, cb = _plateau_run([0.1, 0.3, 0.2, 0.2, 0.25, 0.2, 0.2, 0.1], max_decays=2)
    # Two epochs without beating 0.3: restore 0.3's weights, halve the lr; twice; the third plateau stops.
    assert lrs == [1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.25]
    assert weights[3] == weights[5] == weights[7] == pytest.approx(0.3)
    assert stopped and cb.decays == 2


def test_plateau_restore_can_reset_decays_on_improvement() -> None:
    values = [0.1, 0.0, 0.0, 0.2, 0.1, 0.1, 0.3, 0.2, 0.2]  # a decay, an improvement, a decay, an improvement, ...
    _, _, stopped, counted = _plateau_run(values, max_decays=1)
    assert stopped  # the baselines' count: the second plateau is over the budget of 1 decay
    lrs, _, stopped, reset = _plateau_run(values, max_decays=1, reset_decays_on_improvement=True)
    assert not stopped and reset.decays == 1  # ViV1T's: each improvement gave the budget back
    assert lrs[-1] == pytest.approx(0.125)


def _schedule(values: list[float], **kwargs: Any) -> tuple[list[float], list[int], int | None]:
    """Drive PlateauRestore with ``values``, one per epoch (the weight holds the epoch number before validation, so a
    restore reveals the epoch restored). Returns (lr after each epoch, epochs whose weights were restored, the stop
    epoch or None); epochs count from 1."""
    from types import SimpleNamespace

    module = nn.Linear(1, 1, bias=False)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.005)
    trainer = SimpleNamespace(sanity_checking=False, callback_metrics={}, optimizers=[optimizer], should_stop=False)
    cb = PlateauRestore(**kwargs)
    lrs, restored = [], []
    for epoch, v in enumerate(values, start=1):
        with torch.no_grad():
            module.weight.fill_(epoch)
        trainer.callback_metrics = {"val/single_trial_corr": torch.tensor(v)}
        cb.on_validation_end(trainer, module)  # type: ignore[arg-type]
        lrs.append(optimizer.param_groups[0]["lr"])
        if float(module.weight.detach()) != epoch:
            restored.append(epoch)
        if trainer.should_stop:
            return lrs, restored, epoch
    return lrs, restored, None


def _starter_kit(
    values: list[float], lr_decay_steps: int = 4, patience: int = 5
) -> tuple[list[float], list[int], int | None]:
    """The starter kit's loop replayed: neuralpredictors ``early_stopping`` (interval 1, tolerance 1e-6) driving a
    real torch ``ReduceLROnPlateau`` (factor 0.3, min_lr 1e-4, threshold_mode abs), as ``standard_trainer`` builds
    them. The untrained model's objective (epoch 0) is below every value here, as ours has none."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.005)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=0.3, patience=patience, threshold=1e-6, min_lr=1e-4, threshold_mode="abs"
    )
    lrs: list[float] = []
    restored: list[int] = []
    epoch, best = 0, -1.0
    for _repeat in range(lr_decay_steps):
        patience_counter = 0
        while patience_counter < patience and epoch < len(values):
            epoch += 1
            current = values[epoch - 1]
            scheduler.step(current)
            if -current < -best - 1e-6:
                best, patience_counter = current, 0
            else:
                patience_counter += 1
            lrs.append(optimizer.param_groups[0]["lr"])
        if patience_counter < patience:  # out of epochs (max_iter): the trainer's max_epochs here
            return lrs, restored, None
        restored.append(epoch)  # decay_lr (or, after the last repeat, finalize): the best state back
    return lrs, restored, epoch


def test_plateau_restore_times_the_starter_kit_schedule() -> None:
    """Restore after 5 bad epochs, decay on the 6th unless it improves, stop at the 4th plateau (lr_decay_steps 4)."""
    kit = {
        "patience": 5,
        "factor": 0.3,
        "min_lr": 1e-4,
        "max_decays": 3,
        "timing": "reduce_on_plateau",
        "at_min_lr": "clamp",
    }
    values = [0.1, 0.2, 0.3] + [0.25] * 30  # the best at epoch 3, never beaten
    lrs, restored, stop = _schedule(values, **kit)
    assert restored == [8, 13, 18, 23] and stop == 23  # plateaus end at 3 + 5, 13, 18; the 4th stops
    decays = [e for e in range(2, len(lrs) + 1) if lrs[e - 1] < lrs[e - 2]]
    assert decays == [9, 15, 21]  # the scheduler's count is not reset by a restore: 6 bad epochs after each decay
    assert lrs[-1] == pytest.approx(0.005 * 0.3**3)
    assert (lrs, restored, stop) == _starter_kit(values)
    # An improvement on the epoch after the restore cancels the decay.
    lrs, restored, _ = _schedule([0.1, 0.2, 0.3, *[0.25] * 5, 0.4, *[0.3] * 4], **kit)
    assert restored == [8] and lrs == [0.005] * 13
    # Random sequences: ours and the replayed original agree epoch by epoch.
    rng = np.random.default_rng(0)
    for _ in range(200):
        walk = list(np.round(np.cumsum(rng.normal(0.002, 0.01, 80)), 3))
        assert _schedule(walk, **kit) == _starter_kit(walk)
    # A non-finite metric restores the best weights and stops (early_stopping: "Objective is not Finite").
    _, restored, stop = _schedule([0.1, 0.2, float("nan"), 0.3], **kit)
    assert restored == [3] and stop == 3


def _viv1t(values: list[float], patience: int = 5, max_reduce: int = 3) -> tuple[list[float], list[int], int | None]:
    """ViV1T's ``Scheduler.step`` replayed (mode max, factor 0.3, min_lr eps, min_epochs 0), with train.py's
    ``scheduler.restore()`` after the loop."""
    lr, best, best_epoch, lr_wait, num_reduce = 0.005, 0.0, None, 0, 0
    lrs: list[float] = []
    restored: list[int] = []
    for epoch, value in enumerate(values, start=1):
        terminate = False
        if value > best:
            best, best_epoch, lr_wait, num_reduce = value, epoch, 0, 0
        elif round(value, 2) <= 0.0 and best >= 0.05:
            if best_epoch is not None:
                restored.append(epoch)
        elif lr_wait >= patience - 1:
            if num_reduce >= max_reduce - 1:
                terminate = True
            else:
                num_reduce += 1
                if best_epoch is not None:
                    restored.append(epoch)
                lr = max(0.3 * lr, 1.1920929e-07)  # float32 eps, as viv1t.yaml writes it
                lr_wait = 0
        else:
            lr_wait += 1
        lrs.append(lr)
        if terminate:  # then train.py's scheduler.restore(): the checkpoint, if one was saved
            return lrs, restored if best_epoch is None else [*restored, epoch], epoch
    return lrs, restored, None


def test_plateau_restore_times_viv1ts_scheduler() -> None:
    viv1t = {
        "patience": 5,
        "factor": 0.3,
        "min_lr": 1.1920929e-07,
        "max_decays": 2,
        "threshold": 0.0,
        "reset_decays_on_improvement": True,
        "timing": "together",
        "initial_best": 0.0,
        "restore_on_collapse": True,
        "at_min_lr": "clamp",
    }
    values = [0.1, 0.2, 0.3] + [0.25] * 20
    lrs, restored, stop = _schedule(values, **viv1t)
    assert restored == [8, 13, 18] and stop == 18  # restore and decay together on the 5th bad epoch; 3rd plateau stops
    assert lrs[7] == lrs[6] * 0.3 and (lrs, restored, stop) == _viv1t(values)
    # Below 0 is never the best; a collapse to 0.00 after 0.05 restores without counting as a bad epoch.
    lrs, restored, stop = _schedule([-0.1, 0.06, 0.001, 0.03, 0.03, 0.03, 0.03, 0.03], **viv1t)
    assert restored == [3, 8] and lrs[-1] == pytest.approx(0.0015) and stop is None
    rng = np.random.default_rng(1)
    for _ in range(200):
        walk = list(np.round(np.cumsum(rng.normal(0.002, 0.01, 80)), 3))
        assert _schedule(walk, **viv1t) == _viv1t(walk)
    with pytest.raises(ValueError, match="mode must be max"):
        PlateauRestore(mode="min", restore_on_collapse=True)


# ---------------------------------------------------------------------------------------------------- BudgetDecay
class LrProbe(Callback):
    """The learning rate each training batch runs with."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


class Halve(Callback):
    """Halves every rate before batch ``at`` (a stand-in for PlateauRestore's decays)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == self.at:
            for group in trainer.optimizers[0].param_groups:
                group["lr"] *= 0.5


def test_budget_decay_factor_is_flat_then_linear() -> None:
    cb = BudgetDecay(fraction=0.5, min_ratio=0.1)
    assert [cb.factor(p) for p in (0.0, 0.3, 0.5)] == [1.0, 1.0, 1.0]
    assert cb.factor(0.75) == pytest.approx(0.55)
    assert cb.factor(1.0) == pytest.approx(0.1)


def test_budget_decay_over_max_steps_and_composes_with_scaling(tmp_path: Path) -> None:
    torch.manual_seed(0)
    probe = LrProbe()
    trainer = _toy_trainer(tmp_path, Halve(at=6), BudgetDecay(fraction=0.5), probe, max_steps=8, limit_train_batches=8)
    trainer.fit(Toy(), _toy_data())
    # progress = step / 8; the factor is 1 up to step 4, then (1 − progress) / 0.5; the halving at step 6 stays.
    expected = [0.2] * 5 + [0.2 * 0.75, 0.1 * 0.5, 0.1 * 0.25]
    np.testing.assert_allclose(probe.lrs, expected, rtol=1e-6)


def test_budget_decay_reads_the_time_budget(tmp_path: Path) -> None:
    trainer = _toy_trainer(tmp_path, BudgetDecay(fraction=0.3), max_time="00:00:01:00")
    timer = next(c for c in trainer.callbacks if isinstance(c, Timer))  # type: ignore[attr-defined]
    timer.time_elapsed = lambda stage="train": 51.0  # type: ignore[method-assign]
    timer.time_remaining = lambda stage="train": 9.0  # type: ignore[method-assign]
    cb = next(c for c in trainer.callbacks if isinstance(c, BudgetDecay))  # type: ignore[attr-defined]
    assert cb.progress(trainer) == pytest.approx(0.85)
    assert cb.factor(cb.progress(trainer)) == pytest.approx(0.5)


def test_budget_decay_errors_and_state(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fraction"):
        BudgetDecay(fraction=0.0)
    with pytest.raises(ValueError, match="min_ratio"):
        BudgetDecay(min_ratio=1.5)
    with pytest.raises(ValueError, match="max_time or trainer.max_steps"):
        _toy_trainer(tmp_path, BudgetDecay()).fit(Toy(), _toy_data())

    class Scheduled(Toy):
        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=0.2)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1)}

    with pytest.raises(ValueError, match="model.scheduler"):
        _toy_trainer(tmp_path, BudgetDecay(), max_steps=4).fit(Scheduled(), _toy_data())
    cb = BudgetDecay()
    cb.load_state_dict({"applied": 0.25})
    assert cb.state_dict() == {"applied": 0.25}


# --------------------------------------------------------------------------------------------------- FigureLogger
def _mouse_ids(n: int) -> list[str]:
    """Release-like ids of 58 characters: ``<animal>-<session>-<scan>-Video-<hash>``."""
    ids = [f"dynamic2915{i}-11-10-Video-" + f"{i}8744edeac3b4d1ce16b680916b5267ce"[:33] for i in range(n)]
    assert all(len(m) == 58 for m in ids)
    return ids


def _extents(fig: Any, artists: list[Any]) -> list[Any]:
    renderer = fig.canvas.get_renderer()
    return [a.get_window_extent(renderer) for a in artists if a.get_visible() and a.get_text()]


def test_figures_of_58_character_mouse_ids_render_without_overlaps() -> None:
    import io

    from lightning_sensorium.figures import correlation_histogram, mouse_label, plt, readout_positions, traces

    mice = _mouse_ids(7)
    assert mouse_label(mice[0]) == "dynamic29150-11-10" and len(mouse_label("x" * 58)) == 20
    rng = np.random.default_rng(0)
    hist = correlation_histogram({m: rng.uniform(-0.1, 0.6, 50) for m in mice})
    positions = readout_positions({m: rng.uniform(-1, 1, (30, 2)) for m in mice})
    trace = traces(torch.rand(6, 120), torch.rand(6, 120), rng.uniform(0, 1, 6), skip_frames=50, mouse_id=mice[0])
    for fig in (hist, positions, trace):
        fig.savefig(io.BytesIO(), format="png")  # draws every artist
        page = fig.bbox
        texts = [t for ax in fig.axes for t in (ax.title, ax.xaxis.label, ax.yaxis.label)]
        texts += [t for legend in [*fig.legends, *(ax.get_legend() for ax in fig.axes)] if legend for t in legend.texts]
        boxes = _extents(fig, texts)
        assert all(
            page.x0 - 1 <= b.x0 and b.x1 <= page.x1 + 1 and page.y0 - 1 <= b.y0 and b.y1 <= page.y1 + 1 for b in boxes
        )
        titles = _extents(fig, [ax.title for ax in fig.axes])
        assert not any(a.overlaps(b) for i, a in enumerate(titles) for b in titles[i + 1 :])
    legend_box = hist.legends[0].get_window_extent(hist.canvas.get_renderer())
    assert not legend_box.overlaps(hist.axes[0].get_window_extent())  # beside the histogram, not on it
    for fig in (hist, positions, trace):
        plt.close(fig)


def test_figure_logger_draws_validation_and_test_figures(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_sensorium.callbacks import FigureLogger

    mice = _mouse_ids(2)
    rng = np.random.default_rng(0)
    vectors = {m: {"single_trial_corr_per_neuron": rng.uniform(0, 0.5, 8)} for m in mice}
    module = SimpleNamespace(
        results={stage: {"oracle": {"per_mouse_vectors": vectors}} for stage in ("val", "test")},
        primary_tier=lambda stage: "oracle",
        skip_frames=50,
        readout_positions=lambda: {m: rng.uniform(-1, 1, (8, 2)) for m in mice},
    )
    logger = TensorBoardLogger(str(tmp_path), name="figures")
    trainer = SimpleNamespace(loggers=[logger], global_step=3, is_global_zero=True, sanity_checking=False)
    batch = {"mouse_id": mice[1], "responses": torch.rand(2, 8, 120)}
    callback = FigureLogger()
    callback.on_validation_start(trainer, module)  # type: ignore[arg-type]
    callback.on_validation_batch_end(trainer, module, torch.rand(2, 8, 120), batch, 0)  # type: ignore[arg-type]
    callback.on_validation_end(trainer, module)  # type: ignore[arg-type]
    callback.on_test_start(trainer, module)  # type: ignore[arg-type]
    callback.on_test_batch_end(trainer, module, None, batch, 0)  # type: ignore[arg-type]  # an unscored batch
    callback.on_test_end(trainer, module)  # type: ignore[arg-type]
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    tags = set(events.Tags()["images"])
    assert {"val/traces", "val/correlation_histogram", "val/readout_positions"} <= tags
    assert {"test/correlation_histogram", "test/readout_positions"} <= tags and "test/traces" not in tags
