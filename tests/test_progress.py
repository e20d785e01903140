"""The training progress bar: added by the CLI where the configuration names none, ``Epoch N`` without an epoch cap."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_sensorium.callbacks import ProgressBar
from lightning_sensorium.launch import run_lightning, with_experiment_defaults
from tests.test_experiments import tiny_args


def _cli(tiny_stores: Path, tmp_path: Path, *extra: str) -> object:
    return run_lightning(
        with_experiment_defaults(tiny_args("factorized.yaml", tiny_stores, tmp_path, *extra)), run=False
    )


@pytest.mark.parametrize(("max_epochs", "expected"), [("-1", "Epoch 3"), ("200", "Epoch 3/199")])
def test_the_cli_adds_a_progress_bar_that_counts_epochs_sensibly(
    max_epochs: str, expected: str, tiny_stores: Path, tmp_path: Path
) -> None:
    cli = _cli(tiny_stores, tmp_path, "--trainer.max_epochs", max_epochs)
    bars = [c for c in cli.trainer.callbacks if isinstance(c, ProgressBar)]  # type: ignore[attr-defined]
    assert len(bars) == 1
    bars[0]._trainer = cli.trainer  # type: ignore[attr-defined]  # set by the trainer at fit start
    assert bars[0]._get_train_description(3).strip() == expected


def test_a_disabled_progress_bar_stays_disabled(tiny_stores: Path, tmp_path: Path) -> None:
    cli = _cli(tiny_stores, tmp_path, "--trainer.enable_progress_bar", "false")
    assert cli.trainer.progress_bar_callback is None  # type: ignore[attr-defined]


def test_a_fit_prints_no_warning_of_ours_and_no_lightning_advert(
    tiny_stores: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No warning raised from our code, none about ``args`` beside the caller's own ``sys.argv`` (pytest's here),
    no LeafSpec deprecation (Lightning's own code triggers it) and no "💡 Tip" advert."""
    import warnings

    args = tiny_args(
        "factorized.yaml", tiny_stores, tmp_path, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"
    )
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("INFO"):
        warnings.simplefilter("default")
        run_lightning(with_experiment_defaults(["fit", *args]))
    ours = [f"{w.filename}: {w.message}" for w in caught if "/lightning_sensorium/" in w.filename]
    assert not ours
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "LeafSpec" in m or "args parameter" in m]
    assert not [r for r in caplog.records if r.getMessage().startswith("💡 Tip")]
