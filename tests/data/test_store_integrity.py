"""A store refuses what it cannot read: missing or short chunks, corrupt metadata, a failing server. Zeros are read
only for the responses of hidden test trials, which ``convert`` leaves unwritten."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from lightning_sensorium.data import store as store_module
from lightning_sensorium.data.convert import convert
from lightning_sensorium.data.store import MouseStore, StoreError


@pytest.fixture(scope="module")
def hidden_store(tiny_release_hidden: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One converted mouse whose test tiers are hidden (all-zero responses, not written)."""
    out = tmp_path_factory.mktemp("hidden_stores")
    (path,) = convert([tiny_release_hidden], out, progress=False)
    return Path(path)


@pytest.fixture
def store_copy(hidden_store: Path, tmp_path: Path) -> Path:
    dest = tmp_path / hidden_store.name
    shutil.copytree(hidden_store, dest)
    return dest


def _trial(store: MouseStore, tier: str) -> int:
    return int(store.trials(tier)[0])


def test_hidden_responses_read_as_zeros(store_copy: Path) -> None:
    store = MouseStore(store_copy)
    trial = int(np.flatnonzero(store.hidden)[0])
    assert not (store_copy / "responses" / "c" / str(trial)).exists()  # never written
    assert not store.read(trial, 0, 10)["responses"].any()


@pytest.mark.parametrize(("array", "tier"), [("responses", "oracle"), ("videos", "train")])
def test_a_missing_chunk_is_an_error_naming_the_array_and_trial(store_copy: Path, array: str, tier: str) -> None:
    store = MouseStore(store_copy)
    trial = _trial(store, tier)
    shutil.rmtree(store_copy / array / "c" / str(trial))
    with pytest.raises(StoreError, match=rf"the {array} chunk of trial {trial} .* is missing"):
        MouseStore(store_copy).read(trial, 0, 10)


def test_a_short_chunk_is_an_error(store_copy: Path) -> None:
    store = MouseStore(store_copy)
    trial = _trial(store, "train")
    (chunk,) = [p for p in (store_copy / "videos" / "c" / str(trial)).rglob("*") if p.is_file()]
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(StoreError, match="chunk shorter than expected"):
        MouseStore(store_copy).read(trial, 0, 50)


@pytest.mark.parametrize("array", ["length", "behavior"])
def test_a_missing_small_chunk_is_refused_at_open(store_copy: Path, array: str) -> None:
    shutil.rmtree(store_copy / array / "c")
    with pytest.raises(StoreError, match=rf"{array}: 1 of 1 chunks are missing"):
        MouseStore(store_copy)


def test_a_truncated_small_chunk_names_the_array(store_copy: Path) -> None:
    (chunk,) = [p for p in (store_copy / "behavior" / "c").rglob("*") if p.is_file()]
    chunk.write_bytes(chunk.read_bytes()[:20])
    with pytest.raises(StoreError, match=r"behavior: cannot read"):
        MouseStore(store_copy)


def test_corrupt_metadata_names_the_file(store_copy: Path) -> None:
    (store_copy / "zarr.json").write_text("{ not json")
    with pytest.raises(StoreError, match=r"zarr\.json"):
        MouseStore(store_copy)


class _FlakyHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the stores; the first ``failures`` requests for chunk files of ``videos`` answer 500."""

    failures = 0

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if "/videos/c/" in self.path and type(self).failures > 0:
            type(self).failures -= 1
            self.send_error(500, "flaky")
            return
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def flaky_server(store_copy: Path) -> Iterator[str]:
    handler = functools.partial(_FlakyHandler, directory=str(store_copy.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{store_copy.name}"
    server.shutdown()


def test_http_errors_are_retried_then_reported(
    flaky_server: str, store_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "RETRY_DELAYS", (0.01, 0.01, 0.01))
    local = MouseStore(store_copy)
    trial = _trial(local, "train")
    _FlakyHandler.failures = 2  # two failures, then the answer: retried
    remote = MouseStore(flaky_server)
    np.testing.assert_array_equal(remote.read(trial, 0, 20)["videos"], local.read(trial, 0, 20)["videos"])
    _FlakyHandler.failures = 10  # more failures than retries: one error naming the URL
    with pytest.raises(StoreError, match=rf"videos/c/{trial}/0/0/0: read failed 4 times"):
        MouseStore(flaky_server).read(trial, 0, 20)
    _FlakyHandler.failures = 0
    shutil.rmtree(store_copy / "responses" / "c" / str(_trial(local, "oracle")))  # an HTTP 404
    with pytest.raises(StoreError, match="is missing"):
        MouseStore(flaky_server).read(_trial(local, "oracle"), 0, 20)
