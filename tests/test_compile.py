"""``model.compile_core``: the core's forward compiled by ``torch.compile`` (inductor on CPU) predicts what the eager
core predicts, and the checkpoint's keys do not change."""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_sensorium.launch import run_lightning, with_experiment_defaults
from tests.test_experiments import tiny_args


def _module(tiny_stores: Path, tmp_path: Path, *extra: str) -> object:
    return run_lightning(
        with_experiment_defaults(tiny_args("factorized.yaml", tiny_stores, tmp_path, *extra)), run=False
    )


def test_a_compiled_core_predicts_as_the_eager_one(tiny_stores: Path, tmp_path: Path) -> None:
    eager = _module(tiny_stores, tmp_path)
    compiled = _module(tiny_stores, tmp_path, "--model.compile_core", "true")
    assert compiled.model.state_dict().keys() == eager.model.state_dict().keys()  # type: ignore[attr-defined]
    compiled.model.load_state_dict(eager.model.state_dict())  # type: ignore[attr-defined]
    dm = eager.datamodule  # type: ignore[attr-defined]
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        expected = eager.model.eval()(batch)  # type: ignore[attr-defined]
        got = compiled.model.eval()(batch)  # type: ignore[attr-defined]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert compiled.model.encoder.core._compiled_call_impl is not None  # type: ignore[attr-defined]
