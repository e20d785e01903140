"""Datamodule sampling and normalisation; fit → evaluate end to end; resume; clear errors for bad configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_sensorium.cli import main
from lightning_sensorium.data.datamodule import SensoriumDataModule
from lightning_sensorium.data.normalization import Normalizer, over_time, response_precision
from lightning_sensorium.inference import Stimulus, StimulusInputs
from lightning_sensorium.launch import run_lightning, with_experiment_defaults

EXPERIMENTS = Path(__file__).parents[1] / "experiments"
#: Shrinks any experiment to seconds on CPU: tiny core, short windows, few batches.
FAST = [
    "--trainer.max_epochs",
    "1",
    "--trainer.limit_train_batches",
    "2",
    "--trainer.num_sanity_val_steps",
    "0",
    "--trainer.accelerator",
    "cpu",
    "--trainer.enable_progress_bar",
    "false",
    "--data.frames",
    "24",
    "--data.batch_size",
    "2",
    "--data.eval_batch_size",
    "6",
]


def test_datamodule_batches(tiny_stores: Path) -> None:
    dm = SensoriumDataModule(root=str(tiny_stores), frames=30, frame_step=2, batch_size=3, seed=1)
    assert set(dm.neurons) == set(dm.mouse_ids) and all(n.num_neurons == 24 for n in dm.neurons.values())
    batches = list(dm.train_dataloader())
    assert len(batches) == 2 * int(np.ceil(12 / 3))  # LongCycler: every mouse, max batches per mouse
    assert [b["mouse_id"] for b in batches[:4]] == [dm.mouse_ids[0], dm.mouse_ids[1]] * 2
    b = batches[0]
    assert b["video"].shape == (3, 1, 30, 36, 64) and b["responses"].shape == (3, 24, 30)
    assert b["behavior"].shape == (3, 2, 30) and b["pupil_center"].shape == (3, 2, 30)
    assert torch.isfinite(b["video"]).all()
    # The noiseless rates of the synthetic mice come with evaluation trials only: no loss reads them.
    assert "rates" not in b
    trials = next(iter(dm.trial_loader(["oracle"], max_trials=1)))
    assert trials["rates"].shape == trials["responses"].shape
    # Same seed, same windows; another epoch, other windows.
    again = next(
        iter(
            SensoriumDataModule(root=str(tiny_stores), frames=30, frame_step=2, batch_size=3, seed=1).train_dataloader()
        )
    )
    assert torch.equal(again["video"], b["video"])
    sampler = dm.train_dataloader().sampler
    sampler.set_epoch(1)
    assert list(sampler)[0] != next(iter(dm.train_dataloader().sampler))


def test_official_normalisation(tiny_stores: Path) -> None:
    dm = SensoriumDataModule(root=str(tiny_stores), frames=20)
    mouse = dm.mouse_ids[0]
    store = dm.stores[mouse]
    sample = dm._read(mouse, 0, 10, 30)
    raw = store.read(0, 10, 30)
    precision = response_precision(store.statistics["responses"]["std"])[10:30]
    np.testing.assert_allclose(sample["responses"].numpy(), (raw["responses"] * precision).T, rtol=1e-5)
    stats = store.statistics["videos"]
    expected = (raw["videos"] - stats["mean"][10:30]) / stats["std"][10:30]
    np.testing.assert_allclose(sample["video"][0].numpy(), expected, rtol=1e-4, atol=1e-4)
    raw_dm = SensoriumDataModule(root=str(tiny_stores), frames=20, normalization="raw")
    np.testing.assert_allclose(raw_dm._read(mouse, 0, 10, 30)["video"][0].numpy(), raw["videos"])


def test_response_scale(tiny_stores: Path) -> None:
    """``data.response_scale``: the official per-frame precision over each neuron's mean, at the batch's frames."""
    dm = SensoriumDataModule(root=str(tiny_stores), frames=20, frame_step=2, batch_size=2, response_scale=True)
    mouse = dm.mouse_ids[0]
    std = dm.stores[mouse].statistics["responses"]["std"]  # (T_pad, N)
    precision = response_precision(std)
    finite = np.isfinite(std)
    relative = precision / np.nanmean(np.where(finite, precision, np.nan), axis=0)  # (T_pad, N)
    np.testing.assert_allclose(np.nanmean(np.where(finite, relative, np.nan), axis=0), 1.0, rtol=1e-5)
    assert relative[finite].std() > 0.01  # 12 train trials: the per-frame statistics really vary
    sample = dm._read(mouse, 0, 10, 49)  # a 20-frame window at step 2 covers frames 10, 12, ..., 48
    np.testing.assert_allclose(sample["response_scale"].numpy(), relative[10:49:2].T, rtol=1e-5)
    batch = next(iter(dm.train_dataloader()))
    assert batch["response_scale"].shape == batch["responses"].shape == (2, 24, 20)
    whole = next(iter(dm.trial_loader(["oracle"])))  # whole trials from frame 0, padded to the longest
    length = int(whole["length"][0])
    np.testing.assert_allclose(whole["response_scale"][0, :, :length].numpy(), relative[:length].T, rtol=1e-5)
    assert "response_scale" not in next(iter(SensoriumDataModule(root=str(tiny_stores), frames=20).train_dataloader()))
    with pytest.raises(ValueError, match="data.response_scale"):
        SensoriumDataModule(root=str(tiny_stores), normalization="raw", response_scale=True)


def test_over_time_pools_per_frame_statistics() -> None:
    """Per-frame mean and std pooled over frames = the mean and std over every frame of every trial; frames
    without statistics (NaN, past the shortest trials) are left out."""
    rng = np.random.default_rng(0)
    x = rng.gamma(2.0, 3.0, size=(12, 40, 5)) + np.linspace(0, 4, 40)[None, :, None]  # (trials, T, D), drifting
    mean, std = x.mean(0), x.std(0)  # (T, D) per-frame statistics
    mean, std = np.concatenate([mean, np.full((7, 5), np.nan)]), np.concatenate([std, np.full((7, 5), np.nan)])
    pooled_mean, pooled_std = over_time(mean, std)
    assert pooled_mean.shape == pooled_std.shape == (47, 5)
    np.testing.assert_allclose(pooled_mean, np.broadcast_to(x.reshape(-1, 5).mean(0), (47, 5)), rtol=1e-5)
    np.testing.assert_allclose(pooled_std, np.broadcast_to(x.reshape(-1, 5).std(0), (47, 5)), rtol=1e-5)


def test_time_averaged_input_statistics(tiny_stores: Path) -> None:
    """``data.input_statistics: time_averaged`` normalises the inputs with statistics over all frames (for
    training, evaluation and user stimuli alike) and keeps the official per-frame response scale."""
    dm = SensoriumDataModule(root=str(tiny_stores), frames=20, input_statistics="time_averaged")
    official = SensoriumDataModule(root=str(tiny_stores), frames=20)
    mouse = dm.mouse_ids[0]
    store = dm.stores[mouse]
    stats = store.statistics
    sample, per_frame, raw = dm._read(mouse, 0, 10, 30), official._read(mouse, 0, 10, 30), store.read(0, 10, 30)
    assert torch.equal(sample["responses"], per_frame["responses"])
    video_mean, video_std = over_time(stats["videos"]["mean"], stats["videos"]["std"])
    expected = (raw["videos"] - video_mean[0]) / video_std[0]  # one mean and std per pixel for every frame
    np.testing.assert_allclose(sample["video"][0].numpy(), expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(per_frame["video"].numpy(), sample["video"].numpy(), atol=1e-3)
    pupil_mean, pupil_std = over_time(stats["pupil_center"]["mean"], stats["pupil_center"]["std"])
    expected_pupil = (raw["pupil_center"] - pupil_mean[0]) / pupil_std[0]
    np.testing.assert_allclose(sample["pupil_center"].numpy(), expected_pupil.T, rtol=1e-4, atol=1e-4)
    _, behavior_std = over_time(stats["behavior"]["mean"], stats["behavior"]["std"])
    np.testing.assert_allclose(sample["behavior"].numpy(), (raw["behavior"] / behavior_std[0]).T, rtol=1e-4)
    # User stimuli of a checkpoint trained so, including frames past the recorded statistics.
    video = np.random.default_rng(1).uniform(0, 255, (store.t_pad + 5, *store.video_shape)).astype(np.float32)
    got = StimulusInputs(store, "official", "time_averaged")(Stimulus("a", video), 0)["video"][0, 0].numpy()
    np.testing.assert_allclose(got, (video - video_mean[0]) / video_std[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="data.input_statistics"):
        SensoriumDataModule(root=str(tiny_stores), normalization="raw", input_statistics="time_averaged")
    with pytest.raises(ValueError, match=r"data.input_statistics='hourly'.*per_frame"):
        Normalizer(store, "official", "hourly")  # type: ignore[arg-type]


def test_eval_batches_cover_each_trial_once(tiny_stores: Path) -> None:
    dm = SensoriumDataModule(root=str(tiny_stores), test_tiers=["oracle", "final_test_bonus"], eval_batch_size=4)
    seen = []
    for batch in dm.test_dataloader():
        assert batch["responses"].shape[-1] == batch["length"].max()
        assert batch["clip_index"].max() < dm.clip_counts([batch["tier"]])[batch["tier"]][batch["mouse_id"]]
        seen += [(batch["mouse_id"], int(t)) for t in batch["trial"]]
    expected = sum(len(s.trials(["oracle", "final_test_bonus"])) for s in dm.stores.values())
    assert len(seen) == len(set(seen)) == expected


def test_workers_give_the_same_batches(tiny_stores: Path) -> None:
    kwargs = {"root": str(tiny_stores), "frames": 20, "batch_size": 2, "seed": 5}
    serial = list(SensoriumDataModule(**kwargs).train_dataloader())
    parallel = list(SensoriumDataModule(num_workers=2, **kwargs).train_dataloader())
    assert len(serial) == len(parallel)
    for a, b in zip(serial, parallel, strict=True):
        assert a["mouse_id"] == b["mouse_id"]
        assert torch.equal(a["responses"], b["responses"])


def test_bad_data_options(tiny_stores: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such folder"):
        SensoriumDataModule(root=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no store for"):
        SensoriumDataModule(root=str(tiny_stores), mice=["nobody"])
    with pytest.raises(ValueError, match="unknown tier"):
        SensoriumDataModule(root=str(tiny_stores), val_tiers=["validation"])


def test_every_ddp_rank_gets_an_eval_batch_and_padding_is_marked(tiny_stores: Path) -> None:
    """Under DDP each evaluation batch goes to one rank; a rank left without one gets a padding batch (a copy that
    the module and the writers skip), so every rank runs the evaluation loop and its metric all-reduce."""
    from lightning_sensorium.data.datamodule import EvalTrials, PaddedEvalSampler

    dm = SensoriumDataModule(root=str(tiny_stores), val_tiers=["oracle"], eval_batch_size=100)
    ds = EvalTrials(dm, ["oracle"], 100, skip_hidden=True)
    n = len(ds)  # one batch per mouse
    world = n + 2
    shards = [list(PaddedEvalSampler(ds, world, rank)) for rank in range(world)]
    assert [len(PaddedEvalSampler(ds, world, rank)) for rank in range(world)] == [1] * world
    real = sorted(i for shard in shards for i in shard if i >= 0)
    assert real == list(range(n))  # every batch exactly once
    assert shards[n] == [~0] and shards[n + 1] == [~1]  # the extra ranks: padding copies
    padded, original = ds[shards[n][0]], ds[0]
    assert padded["padding"] is True and "padding" not in original
    torch.testing.assert_close(padded["responses"], original["responses"])
    assert n >= 2 and all(i >= 0 for r in (0, 1) for i in PaddedEvalSampler(ds, 2, r))  # enough: no padding


def fit_args(tmp_path: Path, stores: Path, *extra: str) -> list[str]:
    """``fit`` of a tiny factorized baseline on ``stores`` (FAST), logging and saving under ``tmp_path``."""
    return with_experiment_defaults(
        [
            "fit",
            "--config",
            str(EXPERIMENTS / "factorized.yaml"),
            "--data.root",
            str(stores),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path / "runs"),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--model.core.init_args.hidden_channels",
            "[4, 4, 4]",
            *FAST,
            *extra,
        ]
    )


def _fit(tmp_path: Path, stores: Path, *extra: str) -> object:
    return run_lightning(fit_args(tmp_path, stores, *extra))


def test_fit_evaluate_and_resume(tiny_stores: Path, tmp_path: Path) -> None:
    cli = _fit(tmp_path, tiny_stores)
    trainer = cli.trainer
    assert "val/single_trial_corr" in trainer.callback_metrics
    ckpt = Path(trainer.checkpoint_callback.last_model_path)
    assert ckpt.is_file()
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--ckpt_path", str(ckpt), "--output", str(out), "--accelerator", "cpu"]) == 0
    metrics = json.loads(out.read_text())
    oracle = metrics["tiers"]["oracle"]
    for name in ("single_trial_corr", "repeat_averaged_corr", "oracle_corr", "feve", "ground_truth_corr"):
        assert name in oracle["pooled"]
    assert set(oracle["per_mouse"]) == set(cli.datamodule.mouse_ids)
    assert 0 < oracle["pooled"]["ground_truth_corr"] <= 1
    assert "fraction_of_ground_truth" in oracle["pooled"]
    assert "final_test_bonus" in metrics["tiers"]
    # TensorBoard: scalars per mouse, the hparams tab, and the figures.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trainer.logger.log_dir), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"val/traces", "val/correlation_histogram", "val/readout_positions"} <= set(tags["images"])
    mouse = cli.datamodule.mouse_ids[0]
    assert {"val/single_trial_corr", f"val/single_trial_corr/{mouse}", "val/oracle/single_trial_corr"} <= set(
        tags["scalars"]
    )
    assert any(p.name.startswith("events") for p in Path(trainer.logger.log_dir).iterdir())
    # Resume: the second run continues from the checkpoint's step.
    resumed = _fit(tmp_path, tiny_stores, "--trainer.max_epochs", "2", "--ckpt_path", str(ckpt))
    assert resumed.trainer.current_epoch == 2
    assert resumed.trainer.global_step > trainer.global_step


def test_predict_whole_trials(tiny_stores: Path, tmp_path: Path) -> None:
    cli = _fit(tmp_path, tiny_stores)
    ckpt = cli.trainer.checkpoint_callback.last_model_path
    predictions = cli.trainer.predict(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
    assert predictions
    for out in predictions:
        pred = out["prediction"]
        assert pred.shape[1] == 24 and pred.shape[-1] == int(out["length"].max())
        lost = 18  # the factorized core's temporal receptive field minus one
        assert torch.isnan(pred[..., :lost]).all() and torch.isfinite(pred[..., lost:]).all()


def test_bf16_mixed_fit(tiny_stores: Path, tmp_path: Path) -> None:
    cli = _fit(tmp_path, tiny_stores, "--trainer.precision", "bf16-mixed")
    value = cli.trainer.callback_metrics["val/single_trial_corr"]
    assert torch.isfinite(value)
    assert cli.model.metrics  # metric states stay float64 under autocast (see tests/test_metrics.py)


def test_checkpoint_with_other_neurons_is_refused(tiny_stores: Path, tmp_path: Path) -> None:
    cli = _fit(tmp_path, tiny_stores, "--data.mice", f"[{sorted(p.stem for p in tiny_stores.glob('*.zarr'))[0]}]")
    ckpt = cli.trainer.checkpoint_callback.last_model_path
    other = sorted(p.stem for p in tiny_stores.glob("*.zarr"))[1]
    code = main(["evaluate", "--ckpt_path", ckpt, "--data.mice", other, "--accelerator", "cpu"])
    assert code == 2
