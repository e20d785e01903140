"""Transfer to new mice (``model.pretrained``): a trained core on mice it never saw, frozen or fine-tuned, and the
training-data share (``data.train_fraction``) the data-efficiency curves vary."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lightning_sensorium.cli import main
from lightning_sensorium.data.convert import convert
from lightning_sensorium.data.datamodule import SensoriumDataModule
from lightning_sensorium.data.synthetic import synthesize
from lightning_sensorium.launch import run_lightning
from lightning_sensorium.module import PretrainedError

from .conftest import TINY
from .test_training import fit_args


def _args(tmp_path: Path, stores: Path, *extra: str) -> list[str]:
    """test_training's tiny fit, with one validation batch and no figures."""
    return fit_args(tmp_path, stores, "--trainer.limit_val_batches", "1", "--model.log_figures", "false", *extra)


@pytest.fixture(scope="module")
def pretrained(tiny_stores: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A core trained on the two tiny mice."""
    tmp = tmp_path_factory.mktemp("pretrained")
    cli = run_lightning(_args(tmp, tiny_stores))
    return Path(cli.trainer.checkpoint_callback.last_model_path)


@pytest.fixture(scope="module")
def new_stores(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One new mouse of the same visual system (the generator's feature bank; new neurons, new behaviour)."""
    release = tmp_path_factory.mktemp("new_release")
    synthesize(release, progress=False, workers=1, **{**TINY, "mice": 1, "seed": 7})
    out = tmp_path_factory.mktemp("new_stores")
    convert([release], out, progress=False)
    return out


def _core_state(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    return {k.removeprefix("encoder.core."): v for k, v in state.items() if k.startswith("encoder.core.")}


def test_frozen_core_fits_readouts_for_an_unseen_mouse(pretrained: Path, new_stores: Path, tmp_path: Path) -> None:
    cli = run_lightning(
        _args(tmp_path, new_stores, "--model.pretrained", str(pretrained), "--model.freeze_core", "true")
    )
    model = cli.model
    new_mouse = [p.stem for p in new_stores.glob("*.zarr")]
    assert sorted(model.neurons) == sorted(new_mouse) and sorted(model.encoder.readouts) == sorted(new_mouse)
    before = _core_state(pretrained)
    after = model.encoder.core.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():  # weights and BatchNorm statistics: bit for bit
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)
    groups = [g["name"] for g in cli.trainer.optimizers[0].param_groups]
    assert groups == ["readout"]
    model.train()  # what Lightning calls each epoch: the frozen core stays in eval mode
    assert not model.encoder.core.training and all(r.training for r in model.encoder.readouts.values())
    assert cli.trainer.global_step > 0


def test_fine_tuning_updates_the_core_at_its_own_rate(pretrained: Path, new_stores: Path, tmp_path: Path) -> None:
    cli = run_lightning(_args(tmp_path, new_stores, "--model.pretrained", str(pretrained), "--model.core_lr", "0.05"))
    core_group = next(g for g in cli.trainer.optimizers[0].param_groups if g["name"] == "core")
    assert core_group["lr"] == pytest.approx(0.05)
    before, after = _core_state(pretrained), cli.model.encoder.core.state_dict()
    changed = [k for k, v in before.items() if v.is_floating_point() and not torch.equal(v, after[k])]
    assert changed, "fine-tuning left every core weight unchanged"


def _built(tmp_path: Path, stores: Path, *extra: str) -> object:
    """Model and datamodule of a fit, built but not run."""
    return run_lightning(_args(tmp_path, stores, *extra)[1:], run=False)  # without the subcommand


def test_mice_in_both_keep_or_reinit_their_readouts(pretrained: Path, tiny_stores: Path, tmp_path: Path) -> None:
    state = torch.load(pretrained, map_location="cpu", weights_only=False)["state_dict"]
    for choice, equal in (("keep", True), ("reinit", False)):
        cli = _built(
            tmp_path, tiny_stores, "--model.pretrained", str(pretrained), "--model.pretrained_readouts", choice
        )
        model = cli.model
        model.load_pretrained(str(pretrained), dict(cli.datamodule.hparams))
        ours = model.state_dict()
        readouts = [k for k in state if k.startswith("encoder.readouts.") and state[k].is_floating_point()]
        assert readouts
        same = [torch.equal(ours[k], state[k]) for k in readouts]
        assert all(same) if equal else not all(same), choice
        assert all(torch.equal(ours[k], v) for k, v in state.items() if k.startswith("encoder.core."))


def test_new_mouse_shifter_from_the_mean_of_the_pretrained_ones(
    pretrained: Path, new_stores: Path, tmp_path: Path
) -> None:
    state = torch.load(pretrained, map_location="cpu", weights_only=False)["state_dict"]
    cli = _built(tmp_path, new_stores, "--model.pretrained", str(pretrained), "--model.pretrained_shifter", "mean")
    cli.model.load_pretrained(str(pretrained), dict(cli.datamodule.hparams))
    (mouse,) = list(cli.model.neurons)
    shifter = cli.model.encoder.shifters[mouse].state_dict()
    for key, value in shifter.items():
        saved = [v for k, v in state.items() if k.startswith("encoder.shifters.") and k.endswith("." + key)]
        assert len(saved) == 2
        torch.testing.assert_close(value, torch.stack(saved).mean(0))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--model.core.init_args.hidden_channels", "[8, 8, 8]"), "core does not fit"),
        (("--data.normalization", "raw"), "data.normalization='official'"),
        (("--data.frame_step", "2"), "model.frame_step=1"),
    ],
)
def test_a_core_that_cannot_take_the_data_is_refused_before_training(
    pretrained: Path, new_stores: Path, tmp_path: Path, extra: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        run_lightning(_args(tmp_path, new_stores, "--model.pretrained", str(pretrained), *extra))
    assert not list(tmp_path.rglob("*.ckpt"))


def test_bad_pretrained_files_and_options(
    pretrained: Path,
    new_stores: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    monkeypatch.setattr(
        sys, "argv", ["lightning-sensorium", *_args(tmp_path, new_stores, "--model.pretrained", str(junk))]
    )
    with pytest.raises(SystemExit) as exit_:  # from the console: one line, exit code 2
        main()
    assert exit_.value.code == 2 and "is not a readable checkpoint" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["pytest"])
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(1)}, plain)
    with pytest.raises(PretrainedError, match="not a lightning_sensorium checkpoint"):
        run_lightning(_args(tmp_path, new_stores, "--model.pretrained", str(plain)))
    with pytest.raises(PretrainedError, match="model.pretrained: no checkpoint"):
        run_lightning(_args(tmp_path, new_stores, "--model.pretrained", str(tmp_path / "missing.ckpt")))
    with pytest.raises(ValueError, match="core_lr"):
        _built(tmp_path, new_stores, "--model.freeze_core", "true", "--model.core_lr", "0.1")
    assert not list((tmp_path / "runs").rglob("*.ckpt"))


def test_train_fraction_takes_nested_shares_of_whole_clips(tiny_stores: Path) -> None:
    def trials(fraction: float) -> set[int]:
        dm = SensoriumDataModule(root=str(tiny_stores), frames=24, train_fraction=fraction, seed=3)
        mouse = dm.mouse_ids[0]
        return {int(t) for t in dm._train_trials[mouse]}

    full, half, tiny = trials(1.0), trials(0.5), trials(0.01)
    assert len(tiny) >= 1 and tiny < half < full
    assert len(half) == pytest.approx(len(full) / 2, abs=1)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="data.train_fraction"):
            SensoriumDataModule(root=str(tiny_stores), train_fraction=bad)


def test_transfer_curve_runs_at_tiny_size_and_resumes(pretrained: Path, tmp_path: Path) -> None:
    from tests.test_diagnostics import _script

    curve = _script("transfer_curve")
    out, figure = tmp_path / "curve.json", tmp_path / "curve.png"
    argv = [
        "--pretrained", str(pretrained), "--fractions", "0.5", "1", "--neurons", "24", "--max-steps", "2",
        "--train-trials", "12", "--tiny", "--work", str(tmp_path / "work"), "--out", str(out), "--figure", str(figure),
    ]  # fmt: skip
    points = curve.main(argv)
    assert {(p["mode"], p["fraction"]) for p in points} == {(m, f) for m in curve.MODES for f in (0.5, 1.0)}
    for p in points:
        assert p["steps"] == 2 and 0 < p["ground_truth_corr"] <= 1 and abs(p["fraction_of_ground_truth"]) < 2
        assert (p["fraction"] == 1.0) == (p["train_trials"] == max(q["train_trials"] for q in points))
    frozen = next(p for p in points if p["mode"] == "frozen")
    saved = _core_state(Path(frozen["checkpoint"]))
    assert all(torch.equal(v, saved[k]) for k, v in _core_state(pretrained).items())
    assert figure.stat().st_size > 10_000
    assert curve.main(argv) == points  # everything in --out: nothing refitted
