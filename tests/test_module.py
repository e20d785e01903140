"""SensoriumModule mechanics shared by every model: whole-trial prediction (one pass, per phase, sliding windows),
mixed-mouse batches, distillation, the logged loss and the saved hyper-parameters."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from lightning_sensorium.data.batch import NeuronInfo
from lightning_sensorium.losses import PoissonLoss
from lightning_sensorium.models import Core, Factorized3dCore, GaussianReadout, MLPShifter
from lightning_sensorium.module import SensoriumModule
from lightning_sensorium.predictors import WholeTrialPredictor, mean_where_predicted, tile_windows
from tests.test_training import _fit

EXPERIMENTS = Path(__file__).parents[1] / "experiments"
# training_step called outside a Trainer: its self.log calls have nowhere to go.
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


class FrameCore(Core):
    """A per-frame core (1×1×1 convolution + ELU): output frame t depends on input frame t only."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, channels, 1)

    def forward(self, video: Tensor, behavior: Tensor | None = None, pupil_center: Tensor | None = None) -> Tensor:
        assert behavior is not None
        b, _, t, h, w = video.shape
        maps = behavior[..., None, None].expand(b, 2, t, h, w)  # (B, 2, T, H, W)
        return nn.functional.elu(self.conv(torch.cat([video, maps], 1)))  # (B, C, T, H, W)


class ContextCore(FrameCore):
    """A non-causal core: every output frame also sees the mean over all the frames it is given."""

    def forward(self, video: Tensor, behavior: Tensor | None = None, pupil_center: Tensor | None = None) -> Tensor:
        y = super().forward(video, behavior, pupil_center)  # (B, C, T, H, W)
        return y + y.mean(dim=2, keepdim=True)


def neurons(n: int, mouse: str, seed: int) -> NeuronInfo:
    rng = np.random.default_rng(seed)
    return NeuronInfo(mouse, np.arange(n), rng.uniform(0, 500, (n, 3)), rng.uniform(0.5, 2, n))


def module(core: Core, **kwargs: object) -> SensoriumModule:
    torch.manual_seed(0)
    mice = {"a": neurons(5, "a", 0), "b": neurons(7, "b", 1)}
    m = SensoriumModule(core, GaussianReadout, MLPShifter, neurons=mice, log_figures=False, **kwargs)  # type: ignore[arg-type]
    return m.eval()


def batch(b: int = 2, t: int = 40, mouse: str = "a", seed: int = 0) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    return {
        "mouse_id": mouse,
        "video": torch.randn(b, 1, t, 36, 64, generator=g),
        "behavior": torch.randn(b, 2, t, generator=g),
        "pupil_center": torch.randn(b, 2, t, generator=g) * 0.1,
    }


@torch.no_grad()
def test_sliding_window_equals_one_pass_for_a_causal_core() -> None:
    m = module(Factorized3dCore(hidden_channels=(3, 3, 3)))
    x = batch(t=47)
    expected = m.predict_whole_trials(x)
    got = WholeTrialPredictor(m, eval_window=30)(x)  # 30 frames in, the last 12 out
    assert got.shape == expected.shape == (2, 5, 47)
    assert torch.isnan(got[..., :18]).all() and torch.isnan(expected[..., :18]).all()
    torch.testing.assert_close(got[..., 18:], expected[..., 18:], rtol=1e-4, atol=1e-5)
    one_at_a_time = WholeTrialPredictor(m, eval_window=30, eval_window_batch=1)  # one window per pass: same result
    torch.testing.assert_close(one_at_a_time(x)[..., 18:], expected[..., 18:], rtol=1e-4, atol=1e-5)
    m.eval_window = 30  # the module predicts with its own policy
    torch.testing.assert_close(m.predict_whole_trials(x), got, equal_nan=True)


@torch.no_grad()
def test_whole_trial_predictor_takes_any_batch_model() -> None:
    """A callable on a batch that predicts the last frames of its input: one pass, phases and windows agree."""

    def running_mean(x: dict[str, Tensor]) -> Tensor:  # (B, N=2, T - 3): the mean of each frame and the 3 before
        v = x["video"].mean(dim=(1, 3, 4))  # (B, T)
        return v.unfold(1, 4, 1).mean(-1)[:, None].expand(-1, 2, -1)

    x = batch(t=30)
    whole = WholeTrialPredictor(running_mean)(x)  # (B, 2, T)
    assert torch.isnan(whole[..., :3]).all() and torch.isfinite(whole[..., 3:]).all()
    windows = WholeTrialPredictor(running_mean, eval_window=8, eval_stride=3)(x)
    torch.testing.assert_close(windows[..., 3:], whole[..., 3:])
    phases = WholeTrialPredictor(running_mean, frame_step=2)(x)  # 4 frames of one phase span 7 raw frames
    assert torch.isnan(phases[..., :6]).all() and torch.isfinite(phases[..., 6:]).all()
    averaged = mean_where_predicted([whole, phases])
    torch.testing.assert_close(averaged[..., 3:6], whole[..., 3:6])  # only `whole` predicts these
    torch.testing.assert_close(averaged[..., 6:], (whole[..., 6:] + phases[..., 6:]) / 2)


@torch.no_grad()
def test_sliding_window_with_a_frame_step_covers_both_parities() -> None:
    whole = module(FrameCore())
    stepped = module(FrameCore(), eval_window=4, frame_step=2)  # windows of frames e-6, e-4, e-2, e
    stepped.load_state_dict(whole.state_dict())
    x = batch(t=21)
    torch.testing.assert_close(stepped.predict_whole_trials(x), whole.predict_whole_trials(x), rtol=1e-5, atol=1e-6)
    # Ends 6, 9, 12, 15, 18 every 3 frames, plus 7 (the first odd frames) and 19, 20 (the last frame of each phase;
    # without 19 the odd frames 17 and 19 would be unpredicted): every frame is predicted, as by stride 1.
    stepped.eval_stride = 3
    torch.testing.assert_close(stepped.predict_whole_trials(x), whole.predict_whole_trials(x), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_frame_step_without_a_window_predicts_each_phase_in_one_pass() -> None:
    whole = module(Factorized3dCore(hidden_channels=(3, 3)))
    stepped = module(Factorized3dCore(hidden_channels=(3, 3)), frame_step=2)
    stepped.load_state_dict(whole.state_dict())
    x = batch(t=41)
    pred = stepped.predict_whole_trials(x)
    assert pred.shape == (2, 5, 41)
    # The core loses 14 of each phase's frames (kernels 11 and 5): phase 0 has 21 frames, phase 1 has 20.
    assert torch.isnan(pred[..., :28]).all() and torch.isfinite(pred[..., 28:]).all()
    for phase in (0, 1):  # each phase equals the whole-trial pass over that phase's frames
        sub = {**x, **{k: x[k][:, :, phase::2] for k in ("video", "behavior", "pupil_center")}}  # type: ignore[index]
        expected = whole.predict_whole_trials(sub)  # (B, N, T_p)
        torch.testing.assert_close(pred[..., phase::2][..., 14:], expected[..., 14:])


def test_sliding_window_options_are_checked() -> None:
    with pytest.raises(ValueError, match="eval_stride"):
        module(FrameCore(), eval_window=4, eval_stride=0)
    with pytest.raises(ValueError, match="coprime"):
        module(FrameCore(), eval_window=4, eval_stride=8, frame_step=2)
    short = module(FrameCore(), eval_window=16, frame_step=2)
    with pytest.raises(ValueError, match="shorter than one prediction window of 31 frames"):
        short.predict_whole_trials(batch(t=20))


def _window_tagger(seen: list[int]) -> Callable[[dict[str, Tensor]], Tensor]:
    """A batch model for videos whose pixels hold their frame number: each window's outputs are its last 15
    frames, ``1000 · (first frame of the window) + frame``, so a prediction names the window that made it."""

    def tag(x: dict[str, Tensor]) -> Tensor:
        frames = x["video"][:, 0, :, 0, 0]  # (B·W, L) raw frame numbers
        seen.extend(int(f) for f in frames[:, 0])
        out = 1000 * frames[:, :1] + frames[:, -15:]  # (B·W, 15)
        return out[:, None].expand(-1, 3, -1)  # (B·W, N=3, 15)

    return tag


def _frame_numbered(b: int, t: int) -> dict[str, object]:
    video = torch.arange(t, dtype=torch.float32).view(1, 1, t, 1, 1).expand(b, 1, t, 2, 2)  # (B, 1, T, 2, 2)
    return {"mouse_id": "a", "video": video, "behavior": torch.zeros(b, 2, t), "pupil_center": torch.zeros(b, 2, t)}


@torch.no_grad()
def test_dynamic_v1fm_tiling_is_the_originals_on_a_299_frame_trial() -> None:
    """``eval_tile_from: 50`` predicts each frame from 50 on exactly once, from the window the original uses:
    https://github.com/zhuyu-cs/Dynamic-VFM/blob/main/submission_func/single_model_mainTrack.py, replayed here."""
    t = 299  # a natural trial's valid length
    seen: list[int] = []
    tag = _window_tagger(seen)
    pred = WholeTrialPredictor(tag, eval_window=30, eval_stride=15, eval_tile_from=50, eval_window_batch=7)(
        _frame_numbered(2, t)
    )  # (B, N, T)
    # The original: windows videos[:, :, s : s + 30] for s in range(35, 299 - 24, 15), then [-39:-9] and [-30:];
    # real_out[15 k : 15 k + 15] = out[k] for k, 15 k in zip(range(18), range(0, 249 - 9, 15)); real_out[-9:] =
    # out[-1, -9:] (249 frames: 50 … 298).
    frames = torch.arange(t, dtype=torch.float32)
    stacked = [frames[s : s + 30] for s in range(35, 299 - 24, 15)] + [frames[-39:-9], frames[-30:]]
    out = torch.stack([1000 * w[0] + w[-15:] for w in stacked])  # (18, 15)
    real_out = torch.zeros(249)
    for batch_index, index in zip(range(out.shape[0]), range(0, 249 - 9, 15), strict=False):
        real_out[index : index + 15] = out[batch_index]
    real_out[-9:] = out[-1, -9:]
    assert torch.isnan(pred[..., :50]).all()
    torch.testing.assert_close(pred[..., 50:], real_out.expand(2, 3, 249))
    # Our windows: the original's 16 + its last, without its unused duplicate of the window at 260.
    assert sorted(set(seen)) == [*range(35, 261, 15), 269] and len(seen) == 2 * 17
    kept = [f for end, k in tile_windows(t, 30, 15, 50) for f in range(end - k + 1, end + 1)]
    assert kept == list(range(50, 299))  # every scored frame once, in order


@torch.no_grad()
def test_tiling_on_other_lengths_and_its_errors() -> None:
    for t in (65, 80, 120, 300):  # the last window keeps 1 … 14 frames, or none is needed
        kept = [f for end, k in tile_windows(t, 30, 15, 50) for f in range(end - k + 1, end + 1)]
        assert kept == list(range(50, t))
    assert tile_windows(60, 30, 15, 50) == [(59, 10)]  # no full tile: one window keeps frames 50 … 59
    seen: list[int] = []
    pred = WholeTrialPredictor(_window_tagger(seen), eval_window=30, eval_stride=15, eval_tile_from=50)(
        _frame_numbered(1, 80)
    )
    assert torch.isnan(pred[..., :50]).all()
    assert pred[0, 0, 50:].tolist() == [35_000.0 + f for f in range(50, 65)] + [50_000.0 + f for f in range(65, 80)]
    with pytest.raises(ValueError, match="no frame from eval_tile_from=50"):
        tile_windows(50, 30, 15, 50)
    with pytest.raises(ValueError, match="needs an eval_window"):
        module(FrameCore(), eval_tile_from=50)
    with pytest.raises(ValueError, match="frame_step 1"):
        module(FrameCore(), eval_window=30, eval_stride=15, eval_tile_from=50, frame_step=2)
    with pytest.raises(ValueError, match="first window must start"):
        module(FrameCore(), eval_window=30, eval_stride=15, eval_tile_from=10)
    few = WholeTrialPredictor(
        lambda x: _window_tagger([])(x)[..., -5:], eval_window=30, eval_stride=15, eval_tile_from=50
    )
    with pytest.raises(ValueError, match="need at least 15"):
        few(_frame_numbered(1, 80))


@torch.no_grad()
def test_the_module_tiles_with_its_own_policy() -> None:
    """A per-frame core predicts the same frames by tiles as in one pass; the tiling starts at ``eval_tile_from``."""
    whole = module(FrameCore())
    tiled = module(FrameCore(), eval_window=8, eval_stride=4, eval_tile_from=10)
    tiled.load_state_dict(whole.state_dict())
    x = batch(t=41)
    got, expected = tiled.predict_whole_trials(x), whole.predict_whole_trials(x)
    assert torch.isnan(got[..., :10]).all()
    torch.testing.assert_close(got[..., 10:], expected[..., 10:], rtol=1e-5, atol=1e-6)


def mixed_batch(seed: int = 0) -> dict[str, object]:
    x = batch(b=3, t=6, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x["mouse_id"] = ["a", "b", "a"]
    x["responses"] = [torch.rand(5, 6, generator=g), torch.rand(7, 6, generator=g), torch.rand(5, 6, generator=g)]
    return x


@torch.no_grad()
def test_mixed_batch_loss_is_the_mean_over_samples_of_per_sample_sums() -> None:
    m = module(FrameCore(), loss=PoissonLoss(reduction="sample_mean", scale_by_dataset=False))
    x = mixed_batch()
    per_sample = []
    for i, mouse in enumerate(x["mouse_id"]):  # type: ignore[arg-type]
        sub = {k: x[k][i : i + 1] for k in ("video", "behavior", "pupil_center")}  # type: ignore[index]
        pred = m({**sub, "mouse_id": mouse})[0]  # (N, T)
        y = x["responses"][i]  # type: ignore[index]
        per_sample.append((pred - y * torch.log(pred + 1e-8)).sum())
    torch.testing.assert_close(m.training_step(x, 0), torch.stack(per_sample).mean())


@torch.no_grad()
def test_distillation_blends_real_and_teacher_targets() -> None:
    loss = PoissonLoss(reduction="sample_mean", scale_by_dataset=False)
    student = module(FrameCore(), loss=loss, distill_ratio=0.36)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.add_(0.05)
    x = mixed_batch()
    real = student.training_step(x, 0)
    student._teachers = [teacher]
    blended = student.training_step(x, 0)
    # By hand: the (sample, other mouse) pairs are (0, b), (1, a), (2, b).
    pairs = []
    for i, other in [(0, "b"), (1, "a"), (2, "b")]:
        sub = {k: x[k][i : i + 1] for k in ("video", "behavior", "pupil_center")}  # type: ignore[index]
        pred, target = student({**sub, "mouse_id": other})[0], teacher({**sub, "mouse_id": other})[0]
        pairs.append((pred - target * torch.log(pred + 1e-8)).sum())
    torch.testing.assert_close(blended, 0.64 * real + 0.36 * torch.stack(pairs).mean())


def _fit_mixed(tmp_path: Path, stores: Path, *extra: str) -> object:
    """The tiny factorized fit of tests/test_training.py with mice mixed inside each batch of 4."""
    mixed = ["--data.batch_mode", "mixed", "--data.batch_size", "4", "--model.accumulate_over_mice", "false"]
    return _fit(tmp_path, stores, "--trainer.limit_val_batches", "1", *mixed, *extra)


def test_mixed_batches_fit_and_distil_from_a_checkpoint(tiny_stores: Path, tmp_path: Path) -> None:
    first = _fit_mixed(tmp_path / "a", tiny_stores)
    ckpt = first.trainer.checkpoint_callback.last_model_path  # type: ignore[attr-defined]
    student = _fit_mixed(tmp_path / "b", tiny_stores, "--model.teachers", f"[{ckpt}]")
    assert len(student.model._teachers) == 1  # type: ignore[attr-defined]
    assert torch.isfinite(student.trainer.callback_metrics["train/loss"])  # type: ignore[attr-defined]
    # The teacher is not part of the student: its weights are neither saved nor optimised.
    state = torch.load(student.trainer.checkpoint_callback.last_model_path, weights_only=False)  # type: ignore[attr-defined]
    assert not any(k.startswith("_teachers") for k in state["state_dict"])
    with pytest.raises(FileNotFoundError, match="model.teachers"):
        _fit_mixed(tmp_path / "c", tiny_stores, "--model.teachers", f"[{tmp_path / 'missing.ckpt'}]")


def test_scheduler_steps_per_epoch_comes_from_the_training_loader(tiny_stores: Path, tmp_path: Path) -> None:
    """``WarmupCosineRestart`` without ``steps_per_epoch`` gets the loader's optimizer steps per epoch: batches over
    the cycle over the mice (``accumulate_over_mice``)."""
    scheduler = ["--model.scheduler", "lightning_sensorium.schedulers.WarmupCosineRestart"]
    # No epoch cap (the demo's time budget): Lightning's estimate of the steps never builds the loader then.
    no_cap = ["--trainer.max_epochs", "-1", "--trainer.max_steps", "2", "--model.scheduler_interval", "step"]
    cli = _fit(tmp_path, tiny_stores, *scheduler, *no_cap, "--trainer.limit_val_batches", "1")
    trainer, mice = cli.trainer, len(cli.model.neurons)
    assert mice > 1
    schedule = trainer.lr_scheduler_configs[0].scheduler
    assert schedule.steps_per_epoch == -(-int(trainer.num_training_batches) // mice)


@torch.no_grad()
def test_trials_shorter_than_the_batch_are_predicted_at_their_own_length() -> None:
    """A zero-padded short trial gets the prediction it gets alone, in one pass (a non-causal core sees no padding)
    and by sliding windows (the last one ends at its own last frame)."""
    for m in (module(ContextCore()), module(ContextCore(), eval_window=20, eval_stride=7, frame_step=2)):
        _check_short_trial(m)


def _check_short_trial(m: SensoriumModule) -> None:
    x = batch(t=60)
    x["length"] = torch.tensor([60, 47])
    x["video"][1, :, 47:] = 0  # the loader's padding  # type: ignore[index]
    pred = m.predict_whole_trials(x)
    alone = {k: (v[1:2, :, :47] if isinstance(v, Tensor) and v.dim() > 1 else v) for k, v in x.items()}
    alone.pop("length")
    expected = m.predict_whole_trials(alone)  # (1, N, 47)
    torch.testing.assert_close(pred[1:2, :, :47], expected, equal_nan=True)
    assert torch.isnan(pred[1, :, 47:]).all() and torch.isfinite(pred[1, :, 46]).all()
    first = {k: (v[:1] if isinstance(v, Tensor) and v.dim() > 1 else v) for k, v in x.items()}
    first.pop("length")
    torch.testing.assert_close(pred[:1], m.predict_whole_trials(first), equal_nan=True)


@torch.no_grad()
def test_response_scale_multiplies_predictions_and_divides_training_targets() -> None:
    """A batch's ``response_scale`` (B, N, T) multiplies every prediction frame by frame (in one pass, phase by
    phase at frame step 2, window by window); training divides the targets by it instead, per mouse and mixed."""
    x = batch(t=41)
    scale = 0.5 + torch.rand(2, 5, 41, generator=torch.Generator().manual_seed(3))  # (B, N, T)
    cases = [
        module(Factorized3dCore(hidden_channels=(3, 3))),
        module(Factorized3dCore(hidden_channels=(3, 3)), frame_step=2),
        module(FrameCore(), eval_window=4, frame_step=2, eval_stride=3),
    ]
    for m in cases:
        plain, scaled = m.predict_whole_trials(x), m.predict_whole_trials({**x, "response_scale": scale})
        ok = torch.isfinite(plain)
        assert ok.any() and torch.equal(ok, torch.isfinite(scaled))
        torch.testing.assert_close(scaled[ok], (plain * scale)[ok])
    m = module(FrameCore(), loss=PoissonLoss(reduction="sum", scale_by_dataset=False))
    y = torch.rand(2, 5, 41, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(
        m.training_step({**x, "responses": y, "response_scale": scale}, 0),
        m.training_step({**x, "responses": y / scale}, 0),
    )
    m = module(FrameCore(), loss=PoissonLoss(reduction="sample_mean", scale_by_dataset=False))
    mixed = mixed_batch()
    scales = [torch.full_like(r, 2.0) for r in mixed["responses"]]  # type: ignore[attr-defined]
    halved = {**mixed, "responses": [r / 2 for r in mixed["responses"]]}  # type: ignore[attr-defined]
    torch.testing.assert_close(m.training_step({**mixed, "response_scale": scales}, 0), m.training_step(halved, 0))


def test_fit_logs_the_poisson_nll_and_no_module_in_hyperparameters(tiny_stores: Path, tmp_path: Path) -> None:
    """No "is an instance of `nn.Module`" warning from a fit, a checkpoint load or a module built in code; the
    checkpoint keeps the core's configuration; the loss is logged as the recipe's and per response."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = _fit(tmp_path, tiny_stores, "--trainer.limit_val_batches", "1")
        ckpt = cli.trainer.checkpoint_callback.last_model_path  # type: ignore[attr-defined]
        loaded = SensoriumModule.load_from_checkpoint(ckpt, map_location="cpu")
        built = module(FrameCore())
    assert not [str(w.message) for w in caught if "nn.Module" in str(w.message)]
    assert "core" in torch.load(ckpt, map_location="cpu", weights_only=False)["hyper_parameters"]
    assert not any(isinstance(v, nn.Module) for v in [*loaded.hparams.values(), *built.hparams.values()])
    assert {"train/loss", "train/poisson_nll"} <= set(cli.trainer.callback_metrics)  # type: ignore[attr-defined]


@torch.no_grad()
def test_training_step_logs_the_mean_poisson_nll_of_one_response() -> None:
    """``train/poisson_nll`` is the mean Poisson NLL per (trial, neuron, frame) value, whatever the recipe's loss
    reduction (here the baselines' sum × √(trials/B), ~10⁴ times larger)."""
    m = module(Factorized3dCore(hidden_channels=(3, 3, 3)))
    logged: dict[str, torch.Tensor] = {}
    m.log = lambda name, value, **_: logged.__setitem__(name, value)  # type: ignore[method-assign,assignment,misc]
    x = {**batch(t=30), "responses": torch.rand(2, 5, 30, generator=torch.Generator().manual_seed(1))}
    m.training_step(x, 0)
    pred = m(x)  # (B, N, T') in eval mode: the readout reads its mean positions, the same in both calls
    target = x["responses"][..., -pred.shape[-1] :]  # type: ignore[index]
    expected = (pred - target * torch.log(pred + 1e-8)).mean()
    torch.testing.assert_close(logged["train/poisson_nll"], expected)
    assert logged["train/loss"] > 100 * logged["train/poisson_nll"]
