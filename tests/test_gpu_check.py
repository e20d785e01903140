"""``benchmarks/gpu_check.py`` (``make gpu-check``) runs on the CPU at tiny size (``--dry-run``): the same code as on
a GPU, from the synthetic stores it writes to the JSON of the figures and the 1-device ``ddp`` fit."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytest
import torch

from tests.test_diagnostics import _script

gpu_check = _script("gpu_check")


def test_dry_run_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    originals = tmp_path / "originals"  # no exported original here: skipped, named
    args = ["--dry-run", "--models", "viv1t", "--no-compile", "--out", str(out), "--originals", str(originals)]
    report = gpu_check.main(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    eager = report["models"]["viv1t"]["eager"]
    assert eager["samples_per_s"] > 0 and eager["peak_gib"] > 0 and eager["batch"] == 2
    assert eager["sdpa"] in (["flash"], ["math"], ["efficient"])  # ViV1T's attention runs through SDPA
    assert report["models"]["viv1t"]["compiled"] == {"skipped": "--no-compile"}
    assert "no exported original" in report["models"]["viv1t"]["original"]["skipped"]
    assert report["ddp_fit"]["returncode"] == 0, report["ddp_fit"]
    assert "| viv1t | 2 × " in gpu_check.summary(report)


def test_a_spent_budget_skips_the_rest(tmp_path: Path) -> None:
    report = gpu_check.main(
        ["--dry-run", "--models", "factorized", "--budget-s", "0", "--out", str(tmp_path / "f.json")]
    )
    assert report["models"]["factorized"]["eager"] == {"skipped": "time budget spent"}
    assert report["ddp_fit"] == {"skipped": "time budget spent"}
    assert "time budget spent" in gpu_check.summary(report)


@pytest.mark.slow
def test_dry_run_compiles_the_core(tmp_path: Path) -> None:
    """The compiled phase (about a minute of inductor compilation on a CPU)."""
    report = gpu_check.main(["--dry-run", "--models", "factorized", "--no-ddp", "--out", str(tmp_path / "f.json")])
    compiled = report["models"]["factorized"]["compiled"]
    assert compiled["samples_per_s"] > 0 and "error" not in compiled
    assert report["models"]["factorized"]["eager"]["sdpa"] == []  # convolutions only


def test_a_broken_original_is_recorded_not_raised(tmp_path: Path) -> None:
    """An exported original that does not run (here: an empty folder) leaves its error and command in the figures."""
    (tmp_path / "viv1t_orig").mkdir()
    ns = argparse.Namespace(originals=str(tmp_path), deadline=time.monotonic() + 60, tiny=True, original_timeout=60)
    result = gpu_check.versus_original("viv1t", torch.device("cpu"), ns)
    assert set(result) == {"error", "command"} and "--original" in result["command"]
