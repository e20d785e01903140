"""``lightning-sensorium verify``: an intact store passes; a changed, missing or non-finite chunk is reported with its
array and trial, and the command exits 1."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from lightning_sensorium.cli import main
from lightning_sensorium.data.store import MouseStore
from lightning_sensorium.data.verify import verify_store


@pytest.fixture
def store_copy(tiny_stores: Path, tmp_path: Path) -> Path:
    source = sorted(tiny_stores.glob("*.zarr"))[0]
    dest = tmp_path / source.name
    shutil.copytree(source, dest)
    return dest


def _chunk(store: Path, array: str, trial: int) -> Path:
    (path,) = [p for p in (store / array / "c" / str(trial)).rglob("*") if p.is_file()]
    return path


def test_an_intact_store_passes(store_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = verify_store(store_copy)
    store = MouseStore(store_copy)
    assert report.ok and report.checksums
    assert report.chunks == store.num_trials * 3  # videos, responses, ground-truth rates (no hidden trial here)
    assert main(["verify", str(store_copy), "--quiet"]) == 0
    assert "ok " in capsys.readouterr().out


def test_a_changed_byte_fails_its_checksum(store_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    chunk = _chunk(store_copy, "videos", 4)
    data = bytearray(chunk.read_bytes())
    data[1000] ^= 0xFF  # same size, one pixel changed: only the checksum can tell
    chunk.write_bytes(bytes(data))
    report = verify_store(store_copy)
    assert report.problems == ["videos: trial 4's chunk does not match its checksum (changed since conversion)"]
    assert main(["verify", str(store_copy), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "trial 4" in out and "convert their sessions again" in out


def test_missing_and_non_finite_chunks_are_reported(store_copy: Path) -> None:
    shutil.rmtree(store_copy / "responses" / "c" / "2")
    chunk = _chunk(store_copy, "responses", 5)
    data = np.frombuffer(chunk.read_bytes(), dtype="<f4").copy()
    data[7] = np.inf
    chunk.write_bytes(data.tobytes())
    problems = verify_store(store_copy).problems
    assert any("the responses chunk of trial 2" in p and "is missing" in p for p in problems)
    assert "responses: non-finite values in trial 5" in problems
    assert any("responses: trial 5's chunk does not match" in p for p in problems)


def test_a_store_without_checksums_is_checked_for_the_rest(store_copy: Path) -> None:
    shutil.rmtree(store_copy / "checksums")  # as a store converted before format 4
    report = verify_store(store_copy)
    assert report.ok and not report.checksums and report.chunks > 0


def test_an_unreadable_store_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / "broken.zarr").mkdir()
    (tmp_path / "broken.zarr" / "zarr.json").write_text("{")
    report = verify_store(tmp_path / "broken.zarr")
    assert not report.ok and "zarr.json" in report.problems[0]
