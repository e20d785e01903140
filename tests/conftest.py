"""Shared fixtures: tiny synthetic mice in the official layout, and their zarr stores."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_sensorium.data.convert import convert
from lightning_sensorium.data.synthetic import synthesize

TINY = {"mice": 2, "neurons": 24, "train_trials": 12, "clips_per_tier": 2, "repeats": 3, "seed": 0}


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a tiny synthetic release: two session folders and ``ground_truth/``."""
    root = tmp_path_factory.mktemp("release")
    synthesize(root, progress=False, workers=1, **TINY)
    return root


@pytest.fixture(scope="session")
def tiny_release_hidden(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like ``tiny_release`` but one mouse, with all-zero test responses as for the competition mice."""
    root = tmp_path_factory.mktemp("release_hidden")
    synthesize(root, progress=False, workers=1, hide_test=True, **{**TINY, "mice": 1})
    return root


@pytest.fixture(scope="session")
def tiny_stores(tiny_release: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny release converted: a folder of ``<mouse_id>.zarr`` stores."""
    out = tmp_path_factory.mktemp("stores")
    convert([tiny_release], out, progress=False)
    return out


def sessions(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name != "ground_truth")
