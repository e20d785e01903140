"""Prediction to zarr: any tier (hidden ones included), atomic writes, LightningCLI callback, and user stimuli."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lightning_sensorium.callbacks.prediction_writer import read_predictions
from lightning_sensorium.cli import main
from lightning_sensorium.data.datamodule import SensoriumDataModule
from lightning_sensorium.data.normalization import Normalizer
from lightning_sensorium.inference import Stimulus, StimulusInputs
from lightning_sensorium.launch import run_lightning, with_experiment_defaults
from tests.test_evaluate import EXPERIMENTS, TINY_FIT, fitted

LOST = 18  # leading frames the tiny factorized core cannot predict


@pytest.fixture(scope="module")
def fits(tmp_path_factory: pytest.TempPathFactory, tiny_stores: Path) -> dict[str, Any]:
    return fitted(tmp_path_factory, tiny_stores)


@pytest.fixture(scope="module")
def model(fits: dict[str, Any]) -> Any:
    from lightning_sensorium.module import SensoriumModule

    return SensoriumModule.load_from_checkpoint(fits["checkpoints"][0], map_location="cpu").eval()


def test_predict_tiers_to_zarr(fits: dict[str, Any], model: Any, tiny_stores: Path, tmp_path: Path) -> None:
    out = tmp_path / "preds.zarr"
    args = ["infer", "--ckpt_path", fits["checkpoints"][0], "--out", str(out), "--tiers", "final_test_bonus", "oracle"]
    assert main([*args, "--accelerator", "cpu", "--quiet", "--max-trials", "4"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["preds.zarr"]  # no temporary store left
    preds = read_predictions(out)
    dm = SensoriumDataModule(root=str(tiny_stores), frames=24)
    assert set(preds) == set(dm.mouse_ids)
    for mouse, arrays in preds.items():
        store = dm.stores[mouse]
        rows = np.sort([r for t in ("final_test_bonus", "oracle") for r in store.trials(t)[:4]])
        assert np.array_equal(arrays["trial"], rows)
        assert np.array_equal(arrays["trial_index"], store.trial_index[rows])
        assert np.array_equal(arrays["unit_ids"], store.unit_ids)
        assert arrays["prediction"].shape == (len(rows), store.length[rows].max(), store.num_neurons)
        for i, length in enumerate(store.length[rows]):
            p = arrays["prediction"][i]  # (frame, neuron)
            assert np.isnan(p[:LOST]).all() and np.isfinite(p[LOST:length]).all() and np.isnan(p[length:]).all()
    # Same numbers as the model on the loader's batches.
    batch = next(iter(dm.trial_loader(["oracle"], max_trials=4)))
    with torch.no_grad():
        expected = model.predict_whole_trials(batch)  # (B, N, T)
    arrays = preds[batch["mouse_id"]]
    for b, trial in enumerate(batch["trial"].tolist()):
        row = int(np.flatnonzero(arrays["trial"] == trial)[0])
        length = int(batch["length"][b])
        got = arrays["prediction"][row, LOST:length].T
        np.testing.assert_allclose(got, expected[b, :, LOST:length].numpy(), rtol=1e-5, atol=1e-6)
    # An existing store is kept unless --overwrite.
    assert main([*args, "--accelerator", "cpu", "--quiet", "--max-trials", "1"]) == 2
    assert read_predictions(out)[dm.mouse_ids[0]]["trial"].shape[0] == 8
    assert main([*args, "--accelerator", "cpu", "--quiet", "--max-trials", "1", "--overwrite"]) == 0
    assert read_predictions(out)[dm.mouse_ids[0]]["trial"].shape[0] == 2  # one per tier


def test_lightning_predict_with_writer_callback(fits: dict[str, Any], tiny_stores: Path, tmp_path: Path) -> None:
    out = tmp_path / "lightning.zarr"
    args = ["predict", "--config", str(EXPERIMENTS / "factorized.yaml"), "--data.root", str(tiny_stores)]
    args += ["--ckpt_path", fits["checkpoints"][0], "--return_predictions", "false", *TINY_FIT]
    args += [
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.callbacks+=lightning_sensorium.callbacks.prediction_writer.ZarrPredictionWriter",
    ]
    args += [f"--trainer.callbacks.out={out}", "--data.infer_tiers", "[live_test_main]"]
    run_lightning(with_experiment_defaults(args))
    preds = read_predictions(out)
    dm = SensoriumDataModule(root=str(tiny_stores), frames=24)
    for mouse, arrays in preds.items():
        assert np.array_equal(arrays["trial"], dm.stores[mouse].trials("live_test_main"))


def test_predict_user_video(fits: dict[str, Any], model: Any, tiny_stores: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    dm = SensoriumDataModule(root=str(tiny_stores), frames=24)
    mouse = dm.mouse_ids[1]
    store = dm.stores[mouse]
    t = 60
    video = rng.uniform(0, 255, (t, *store.video_shape)).astype(np.float32)
    behavior = rng.uniform(0, 10, (t, 2)).astype(np.float32)
    np.save(tmp_path / "video.npy", video)
    np.save(tmp_path / "behavior.npy", behavior)
    out = tmp_path / "user.zarr"
    args = ["infer", "--ckpt_path", fits["checkpoints"][0], "--stimulus", str(tmp_path / "video.npy")]
    args += ["--mouse", mouse, "--behavior", str(tmp_path / "behavior.npy"), "--out", str(out)]
    assert main([*args, "--accelerator", "cpu", "--quiet"]) == 0
    got = read_predictions(out)[mouse]
    assert got["prediction"].shape == (1, t, store.num_neurons) and got["length"].tolist() == [t]
    # By hand: the mouse's official per-frame normalisation, default pupil centre = its train mean.
    train = store.trials("train")
    valid = np.arange(store.t_pad)[None] < store.length[train][:, None]
    pupil = np.broadcast_to(store.pupil_center[train][valid].mean(0), (t, 2)).astype(np.float32)
    raw = {"videos": video, "responses": np.zeros((t, store.num_neurons), np.float32)}
    x = Normalizer(store)({**raw, "behavior": behavior, "pupil_center": pupil}, np.arange(t))
    batch = {
        "mouse_id": mouse,
        "video": torch.from_numpy(x["videos"])[None, None],  # (1, 1, T, H, W)
        "behavior": torch.from_numpy(np.ascontiguousarray(x["behavior"].T))[None],  # (1, 2, T)
        "pupil_center": torch.from_numpy(np.ascontiguousarray(x["pupil_center"].T))[None],
    }
    with torch.no_grad():
        expected = model.predict_whole_trials(batch)[0].T.numpy()  # (T, N)
    assert np.isnan(got["prediction"][0, :LOST]).all()
    np.testing.assert_allclose(got["prediction"][0, LOST:], expected[LOST:], rtol=1e-4, atol=1e-5)


def test_stimulus_folder_long_videos_and_errors(fits: dict[str, Any], tiny_stores: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    dm = SensoriumDataModule(root=str(tiny_stores), frames=24)
    mouse = dm.mouse_ids[0]
    store = dm.stores[mouse]
    folder = tmp_path / "stimuli"
    folder.mkdir()
    np.save(folder / "long.npy", rng.integers(0, 256, (store.t_pad + 40, *store.video_shape), dtype=np.uint8))
    np.save(folder / "short.npy", rng.uniform(0, 255, (30, *store.video_shape)))
    np.save(folder / "short.pupil_center.npy", rng.normal(100, 5, (30, 2)))
    out = tmp_path / "folder.zarr"
    args = ["infer", "--ckpt_path", fits["checkpoints"][0], "--stimulus", str(folder), "--mouse", mouse]
    assert main([*args, "--out", str(out), "--accelerator", "cpu", "--quiet"]) == 0
    got = read_predictions(out)[mouse]
    assert got["length"].tolist() == [store.t_pad + 40, 30]  # sorted by name: long, short
    assert np.isfinite(got["prediction"][0, LOST:]).all()  # past the recorded statistics too
    assert np.isfinite(got["prediction"][1, LOST:30]).all() and np.isnan(got["prediction"][1, 30:]).all()
    # Missing behaviour is the mouse's train mean: the same inputs as passing that mean explicitly.
    inputs = StimulusInputs(store)
    video = rng.uniform(0, 255, (25, *store.video_shape))
    implicit = inputs(Stimulus("a", video), 0)
    explicit = inputs(Stimulus("a", video, np.tile(inputs.mean_behavior, (25, 1))), 0)
    assert torch.equal(implicit["behavior"], explicit["behavior"])
    # Clear errors.
    np.save(tmp_path / "hwt.npy", np.zeros((*store.video_shape, 30)))
    np.save(tmp_path / "bright.npy", np.full((30, *store.video_shape), 300.0))
    for name, match in (("hwt.npy", "transpose to"), ("bright.npy", "0..255")):
        with pytest.raises(ValueError, match=match):
            inputs(Stimulus(name, np.load(tmp_path / name)), 0)
        bad = ["infer", "--ckpt_path", fits["checkpoints"][0], "--stimulus", str(tmp_path / name), "--mouse", mouse]
        assert main([*bad, "--out", str(tmp_path / "bad.zarr"), "--accelerator", "cpu", "--quiet"]) == 2
    assert not (tmp_path / "bad.zarr").exists()
    no_mouse = ["infer", "--ckpt_path", fits["checkpoints"][0], "--stimulus", str(folder), "--out", str(tmp_path / "x")]
    assert main([*no_mouse, "--accelerator", "cpu"]) == 2  # two mice: --mouse is required


def test_user_stimuli_follow_the_viv1t_normalisation(tiny_stores: Path, tmp_path: Path) -> None:
    """A ViV1T-normalised model's user stimuli get ViV1T's inputs: over the recorded frames the same as a trial read
    through the data module, then the time average of its per-frame transform."""
    from tests.test_normalization import copy_stores

    dm = SensoriumDataModule(root=str(copy_stores(tiny_stores, tmp_path / "s")), frames=24, normalization="viv1t")
    mouse = dm.mouse_ids[0]
    store = dm.stores[mouse]
    trial = int(store.trials("oracle")[0])
    length = int(store.length[trial])
    raw = store.read(trial, 0, length)
    stimulus = Stimulus("trial", raw["videos"].astype(np.float32), raw["behavior"], raw["pupil_center"])
    inputs = StimulusInputs(store, normalizer=dm.normalizers[mouse])
    assert inputs.normalization == "viv1t" and inputs.stat_frames >= length
    got, read = inputs(stimulus, 0), dm._read(mouse, trial, 0, length, scored=False)
    for key in ("video", "behavior", "pupil_center"):
        np.testing.assert_allclose(got[key][0].numpy(), read[key].numpy(), rtol=1e-5, atol=1e-6)
    longer = Stimulus("long", np.zeros((length + 5, *store.video_shape), np.float32))
    video = inputs(longer, 0)["video"][0, 0].numpy()  # (T + 5, H, W)
    norm = dm.normalizers[mouse].inputs
    tail = -norm["video_shift"][:length].mean(0) * norm["video_gain"][:length].mean(0)
    np.testing.assert_allclose(video[length:], np.broadcast_to(tail, (5, *tail.shape)), rtol=1e-5, atol=1e-6)
