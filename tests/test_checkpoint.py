"""Checkpoints a crash cannot take away: ``last.ckpt`` is the latest state (also on a step/time schedule), written
atomically, never non-finite; a non-finite loss stops the fit with the step and what to try; a SIGKILLed fit leaves a
loadable ``last.ckpt``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_sensorium.callbacks.checkpoint import ModelCheckpoint, NonFiniteError
from lightning_sensorium.launch import run_lightning, with_experiment_defaults
from tests.test_experiments import tiny_args

CALLBACK = "lightning_sensorium.callbacks.ModelCheckpoint"


def _fit(tiny_stores: Path, tmp_path: Path, *extra: str) -> object:
    base = ["--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1", "--trainer.accelerator", "cpu"]
    args = tiny_args("factorized.yaml", tiny_stores, tmp_path, *base, "--data.batch_size", "2", *extra)
    return run_lightning(with_experiment_defaults(["fit", *args]))


class KillAt(L.Callback):
    """SIGKILLs its own process before the first batch after ``step`` optimizer steps (their checkpoint written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, i: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def _callbacks(tmp_path: Path, kill_at: int | None = None, **init_args: object) -> list[str]:
    """``--config`` of a YAML whose callbacks are our ModelCheckpoint with ``init_args`` (save_last on), and
    :class:`KillAt` where ``kill_at`` is given."""
    path = tmp_path / "checkpoint.yaml"
    lines = ["trainer:", "  callbacks:", f"    - class_path: {CALLBACK}", "      init_args:"]
    lines += [f"        {k}: {v}" for k, v in {"save_last": "true", **init_args}.items()]
    if kill_at is not None:
        lines += ["    - class_path: tests.test_checkpoint.KillAt", "      init_args:", f"        step: {kill_at}"]
    path.write_text("\n".join(lines))
    return ["--config", str(path)]


def _checkpoint(cli: object) -> ModelCheckpoint:
    return next(c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint))  # type: ignore[attr-defined]


def _step(path: str | Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def test_last_is_the_latest_state_even_when_validation_stops_improving(
    tiny_stores: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation improves only at epoch 0 (the top-k check says so): Lightning's own callback would leave
    ``last.ckpt`` at the end of epoch 0; ours holds the final step."""
    calls: list[int] = []

    def first_only(self: ModelCheckpoint, trainer: object, current: object = None) -> bool:
        calls.append(1)
        return len(calls) == 1

    monkeypatch.setattr(ModelCheckpoint, "check_monitor_top_k", first_only)
    cli = _fit(tiny_stores, tmp_path, "--trainer.max_epochs", "4", "--trainer.num_sanity_val_steps", "0")
    check = _checkpoint(cli)
    final = cli.trainer.global_step  # type: ignore[attr-defined]
    assert len(calls) == 4 and 0 < _step(check.best_model_path) < final  # the end of epoch 0
    assert _step(check.last_model_path) == final
    assert not [p for p in Path(check.dirpath).iterdir() if ".tmp-" in p.name]  # nothing half-written left


def test_last_is_refreshed_every_n_steps_without_validation(
    tiny_stores: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A demo-style run (no validation, a budget) has a checkpoint of the latest state on the schedule."""
    saved: list[int] = []
    original = ModelCheckpoint._save_checkpoint

    def spy(self: ModelCheckpoint, trainer: object, filepath: str) -> None:
        original(self, trainer, filepath)  # type: ignore[arg-type]
        saved.append(trainer.global_step)  # type: ignore[attr-defined]

    monkeypatch.setattr(ModelCheckpoint, "_save_checkpoint", spy)
    no_val = ["--trainer.check_val_every_n_epoch", "1000", "--trainer.num_sanity_val_steps", "0"]
    every = _callbacks(tmp_path, latest_every_n_steps=2)
    cli = _fit(tiny_stores, tmp_path, "--trainer.max_steps", "7", "--trainer.max_epochs", "-1", *no_val, *every)
    assert {2, 4, 6} <= set(saved)  # every 2 optimizer steps (and at epoch ends)
    assert _step(_checkpoint(cli).last_model_path) == 7


def test_a_failed_save_keeps_the_previous_checkpoint(
    tiny_stores: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli = _fit(tiny_stores, tmp_path, "--trainer.max_epochs", "1")
    check = _checkpoint(cli)
    last = Path(check.last_model_path)
    before = last.read_bytes()

    def crash(self: object, filepath: str, weights_only: bool = False) -> None:
        Path(filepath).write_bytes(b"half a checkpoint")
        raise OSError("killed mid-save")

    monkeypatch.setattr(type(cli.trainer), "save_checkpoint", crash)  # type: ignore[attr-defined]
    with pytest.raises(OSError, match="killed mid-save"):
        check._save_checkpoint(cli.trainer, str(last))  # type: ignore[attr-defined]
    assert last.read_bytes() == before
    assert not [p for p in last.parent.iterdir() if ".tmp-" in p.name]


def test_a_huge_learning_rate_stops_at_the_first_non_finite_loss(tiny_stores: Path, tmp_path: Path) -> None:
    with pytest.raises(NonFiniteError, match=r"step \d+: the training loss is (NaN|inf|-inf); .*lower learning rate"):
        _fit(tiny_stores, tmp_path, "--trainer.max_epochs", "3", "--model.optimizer.init_args.lr", "1e12")
    for ckpt in tmp_path.rglob("*.ckpt"):  # whatever was written holds finite weights
        state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), ckpt


def test_a_non_finite_weight_is_never_saved(tiny_stores: Path, tmp_path: Path) -> None:
    cli = _fit(tiny_stores, tmp_path, "--trainer.max_epochs", "1")
    check = _checkpoint(cli)
    before = Path(check.last_model_path).read_bytes()
    with torch.no_grad():
        next(cli.model.parameters()).fill_(float("nan"))  # type: ignore[attr-defined]
    with pytest.raises(NonFiniteError, match="is not finite; .* was not written"):
        check._save_checkpoint(cli.trainer, check.last_model_path)  # type: ignore[attr-defined]
    assert Path(check.last_model_path).read_bytes() == before


def _resume_args(tmp_path: Path, tiny_stores: Path, run: str, kill_at: int | None = None) -> list[str]:
    """A fit of 10 optimizer steps over 2 epochs (5 steps each: 10 single-mouse batches, gradients accumulated over
    the 2 mice), ``last.ckpt`` after every step, killed by SIGKILL after ``kill_at`` steps."""
    (tmp_path / run).mkdir()
    return tiny_args(
        "factorized.yaml",
        tiny_stores,
        tmp_path / run,
        "--trainer.max_steps",
        "10",
        "--trainer.max_epochs",
        "-1",
        "--trainer.check_val_every_n_epoch",
        "1000",
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.accelerator",
        "cpu",
        "--data.batch_size",
        "2",
        "--data.samples_per_epoch",
        "9",
        *_callbacks(tmp_path / run, kill_at=kill_at, latest_every_n_steps=1),
    )


@pytest.fixture(scope="module")
def uninterrupted(tiny_stores: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    tmp = tmp_path_factory.mktemp("whole")
    cli = run_lightning(with_experiment_defaults(["fit", *_resume_args(tmp, tiny_stores, "whole")]))
    assert cli.trainer.global_step == 10  # type: ignore[attr-defined]
    return {k: v.clone() for k, v in cli.model.state_dict().items()}  # type: ignore[attr-defined]


@pytest.mark.parametrize("kill_at", [3, 5], ids=["mid-epoch", "epoch-end"])
def test_a_sigkilled_fit_resumes_bit_exactly(
    kill_at: int, uninterrupted: dict[str, torch.Tensor], tiny_stores: Path, tmp_path: Path
) -> None:
    """Killed by SIGKILL, then resumed from ``last.ckpt``: every final weight equals the uninterrupted run's (global
    RNG of torch, numpy and Python, the position inside the epoch, optimiser and scheduler restored)."""
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_sensorium", "fit", *_resume_args(tmp_path, tiny_stores, "run", kill_at)],
        cwd=Path(__file__).parents[1],
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    (last,) = (tmp_path / "run").rglob("last.ckpt")
    assert _step(last) == kill_at
    args = _resume_args(tmp_path, tiny_stores, "resumed")  # the same recipe, without the kill
    resumed = run_lightning(with_experiment_defaults(["fit", *args, "--ckpt_path", str(last)]))
    assert resumed.trainer.global_step == 10  # type: ignore[attr-defined]
    for name, value in resumed.model.state_dict().items():  # type: ignore[attr-defined]
        torch.testing.assert_close(value, uninterrupted[name], rtol=0, atol=0, msg=f"{name} after resuming")


def test_resuming_continues_in_the_same_run_folder(tiny_stores: Path, tmp_path: Path) -> None:
    first = _fit(tiny_stores, tmp_path, "--trainer.max_epochs", "1")
    run = Path(first.trainer.logger.log_dir)  # type: ignore[attr-defined]
    last = _checkpoint(first).last_model_path
    before = _step(last)
    again = _fit(tiny_stores, tmp_path, "--trainer.max_epochs", "2", "--ckpt_path", last)
    assert Path(again.trainer.logger.log_dir) == run  # type: ignore[attr-defined]
    assert sorted(p.name for p in run.parent.iterdir()) == [run.name]  # no second version
    assert _step(_checkpoint(again).last_model_path) == again.trainer.global_step > before  # type: ignore[attr-defined]
