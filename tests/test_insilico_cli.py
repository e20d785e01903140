"""In-silico experiments on trained checkpoints and through `lightning-sensorium insilico`: inputs normalised like
`infer`'s, gradient RFs and MEIs, zarr results with dimension names, figures, and bad input refused with nothing
written (issue #26)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from lightning_sensorium.cli import main
from lightning_sensorium.inference import Stimulus
from lightning_sensorium.insilico import experiments as ex
from lightning_sensorium.insilico.mei import most_exciting_inputs
from lightning_sensorium.insilico.output import read_results, write_results
from lightning_sensorium.insilico.responders import GroundTruth, TrainedModel, load_trained
from lightning_sensorium.insilico.run import figures_folder
from tests.conftest import sessions
from tests.test_evaluate import fitted


@pytest.fixture(scope="module")
def fits(tmp_path_factory: pytest.TempPathFactory, tiny_stores: Path) -> dict[str, Any]:
    return fitted(tmp_path_factory, tiny_stores)


@pytest.fixture(scope="module")
def mouse(tiny_release: Path) -> str:
    return sessions(tiny_release)[0].name


@pytest.fixture(scope="module")
def model(fits: dict[str, Any], tiny_stores: Path, mouse: str) -> TrainedModel:
    return load_trained(fits["checkpoints"], mouse, {"root": str(tiny_stores)})


def test_trained_model_sees_inputs_as_infer_does(model: TrainedModel) -> None:
    """The responder's differentiable normalisation equals StimulusInputs' (the one home of the conversion)."""
    rng = np.random.default_rng(0)
    video = rng.uniform(0, 255, (40, 36, 64)).astype(np.float32)
    behavior = np.tile(np.array([[45.0, 3.0]], np.float32), (40, 1))
    gaze = np.tile(np.asarray(model.rest_pupil_center, np.float32)[None], (40, 1))
    ours = model(
        torch.from_numpy(video)[None, None], torch.from_numpy(behavior.T)[None], torch.from_numpy(gaze.T)[None]
    )
    batch = model.inputs(Stimulus("x", video, behavior, gaze), 0)
    with torch.no_grad():
        theirs = model.model.predict_whole_trials(batch)
    assert ours.shape == (1, 24, 40)
    assert torch.allclose(ours, theirs, equal_nan=True)
    assert 0 < model.grey < 255 and model.differentiable


def test_gradient_rf_and_mei_on_a_trained_model(model: TrainedModel, tmp_path: Path) -> None:
    ids = model.unit_ids[:3]
    grad = ex.gradient_receptive_fields(model, ids, frames=30, seeds=1)
    assert grad["grad_energy"].shape == (3, 36, 64) and np.isfinite(grad["grad_energy"]).all()
    assert (grad["grad_energy"].reshape(3, -1).max(1) > 0).all()
    natural = [np.random.default_rng(k).uniform(0, 255, (24, 36, 64)).astype(np.float32) for k in range(2)]
    mei = most_exciting_inputs(model, ids[:2], frames=24, window=4, steps=3, seeds=2, natural=natural, batch_size=2)
    images, act = mei["mei_image"], mei["activation"]  # (n, H, W), (n, kind, seed)
    assert images.shape == (2, 36, 64) and mei["mei_video"].shape == (2, 24, 36, 64)
    assert images.min() >= 0 and images.max() <= 255
    rms = np.sqrt(np.mean(((images - model.grey) / min(model.grey, 255 - model.grey)) ** 2, axis=(1, 2)))
    assert (rms <= 0.25 + 1e-4).all()  # the contrast budget
    assert np.isfinite(act).all() and (mei["best_natural"] > 0).all()
    out = tmp_path / "mei.zarr"
    write_results([mei], out, {"experiment": "mei"}, figures=figures_folder(out))
    assert read_results(out)["mei"]["mei_video"].shape == (2, 24, 36, 64)
    gif = Image.open(figures_folder(out) / "mei_video.gif")
    assert gif.n_frames == 24 and gif.size == (3 * (2 * 64 + 2), 3 * 36)
    assert (figures_folder(out) / "mei.png").is_file()
    # Gradient ascent beats the grey screen: the MEI drives each neuron more than a blank does.
    blank = ex.clip_responses(model, [np.full((24, 36, 64), model.grey, np.float32)], ids[:2], settle=20)
    assert (act[:, 0].max(1) > blank["clip_response"][:, 0]).all()


def test_cli_size_on_the_generator_writes_zarr_and_figures(tiny_release: Path, mouse: str, tmp_path: Path) -> None:
    gt = GroundTruth.from_release(tiny_release, mouse)
    ids = [int(u) for u in gt.unit_ids[:6]]
    out = tmp_path / "size.zarr"
    args = ["insilico", "size", "--ground-truth", str(tiny_release), "--mouse", mouse, "--out", str(out), "--quiet"]
    assert main([*args, "--neurons", *map(str, ids)]) == 0
    group = zarr.open_group(str(out), mode="r")
    rf = group["receptive_field"]
    assert rf["sta_energy"].metadata.dimension_names == ("neuron", "y", "x")
    assert rf["rf_x"].metadata.dimension_names == ("neuron",)
    assert list(rf["unit_ids"][...]) == ids
    assert group.attrs["responder"] == "GroundTruth" and group.attrs["mouse_id"] == mouse
    results = read_results(out)["receptive_field"]
    assert results["attrs"]["recovery"]["rf_error_median_px"] < 1.5
    dx, dy = results["rf_x"] - results["true_rf_x"], results["rf_y"] - results["true_rf_y"]
    assert np.allclose(results["rf_error"], np.hypot(dx, dy))
    tuning, size = read_results(out)["tuning"], read_results(out)["size_tuning"]
    assert tuning["responses"].shape == (6, 8, 5, 3) and size["size_curve"].shape == (6, 8)
    assert group["tuning/responses"].metadata.dimension_names == ("neuron", "direction", "sf", "tf")
    assert tuning["attrs"]["recovery"]["orientation_accuracy"] == 1.0
    figures = {p.name: p.stat().st_size for p in figures_folder(out).iterdir()}
    assert set(figures) == {"receptive_field.png", "tuning.png", "size_tuning.png"} and min(figures.values()) > 1000
    assert main([*args, "--neurons", str(ids[0])]) == 2  # exists: refused without --overwrite


def test_cli_behaviour_on_a_checkpoint_scored_against_the_truth(
    fits: dict[str, Any], tiny_release: Path, tiny_stores: Path, mouse: str, tmp_path: Path
) -> None:
    out = tmp_path / "behavior.zarr"
    ids = GroundTruth.from_release(tiny_release, mouse).unit_ids[:2]
    args = ["insilico", "behavior", "--ckpt_path", *fits["checkpoints"], "--ground-truth", str(tiny_release)]
    args += ["--mouse", mouse, "--data.root", str(tiny_stores), "--out", str(out), "--quiet"]
    assert main([*args, "--neurons", *map(str, ids), "--tensorboard", str(tmp_path / "tb")]) == 0
    res = read_results(out)["behavior"]
    assert res["state_response"].shape == (2, 4) and res["attrs"]["labels"]["state"][:2] == ["quiet", "running"]
    assert np.isfinite(res["running_gain"]).all() and res["true_run_weight"].shape == (2,)
    assert "running_gain_spearman" in res["attrs"]["recovery"]
    group = zarr.open_group(str(out))
    assert group.attrs["responder"] == "TrainedModel" and group.attrs["checkpoints"] == fits["checkpoints"]
    assert group["behavior/state_response"].metadata.dimension_names == ("neuron", "state")
    assert (figures_folder(out) / "behavior.png").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert "insilico/behavior" in events.Tags()["images"]
    assert "insilico/behavior/recovery/running_gain_sign_accuracy" in events.Tags()["scalars"]


def _refused(args: list[str], out: Path, capsys: pytest.CaptureFixture[str], message: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists() and not figures_folder(out).exists()
    assert not list(out.parent.glob(f".{out.name}*"))  # no temporary left either


def test_cli_bad_input_is_refused_with_nothing_written(
    fits: dict[str, Any],
    tiny_release: Path,
    tiny_stores: Path,
    mouse: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "bad.zarr"
    gt = ["insilico", "rf", "--ground-truth", str(tiny_release), "--out", str(out), "--quiet"]
    ckpt = ["--ckpt_path", *fits["checkpoints"], "--data.root", str(tiny_stores)]
    _refused([*gt, "--mouse", "nobody"], out, capsys, "--mouse nobody: not a mouse of")
    _refused([*gt], out, capsys, "--mouse: choose the mouse")
    _refused([*gt, "--mouse", mouse, "--neurons", "99999"], out, capsys, "neurons [99999]: not unit ids of mouse")
    _refused([*gt[:1], "tuning", *ckpt, "--mouse", "nobody", *gt[4:]], out, capsys, "do not know this mouse")
    _refused(["insilico", "rf", "--out", str(out)], out, capsys, "give --ckpt_path")
    clips = tmp_path / "clips"
    clips.mkdir()
    np.save(clips / "a.npy", np.zeros((40, 36, 60), np.float32))
    base = ["insilico", "clips", "--ground-truth", str(tiny_release), "--mouse", mouse, "--out", str(out), "--quiet"]
    _refused([*base, "--clips", str(clips)], out, capsys, "video shape (40, 36, 60), expected (T, 36, 64)")
    np.save(clips / "a.npy", np.full((40, 36, 64), 80, np.float32))
    _refused([*base, "--clips", str(clips), "--fps", "60"], out, capsys, "--fps 60: the model's stimuli run at 30 Hz")
    _refused([*gt[:1], "mei", *gt[2:], "--mouse", mouse], out, capsys, "not differentiable")
    # The same clip at the right size and rate works.
    assert main([*base, "--clips", str(clips)]) == 0
    assert read_results(out)["clips"]["clip_response"].shape == (24, 1)


def test_insilico_help_stays_light() -> None:
    """``insilico --help`` reads the experiment names without importing torch or the experiments."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom lightning_sensorium.cli import main\n"
        "try:\n    main(['insilico', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', [m for m in ('torch', 'lightning_sensorium.insilico.experiments') if m in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in result.stdout and "gradient_rf" in result.stdout, result.stdout
