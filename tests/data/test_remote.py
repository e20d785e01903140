"""`data.root` as an fsspec URL: stores served over HTTP on loopback stream like local ones."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_sensorium.data.datamodule import SensoriumDataModule


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_root(tiny_stores: Path) -> Iterator[str]:
    handler = functools.partial(_QuietHandler, directory=str(tiny_stores))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_stores_equal_local(http_root: str, tiny_stores: Path) -> None:
    mice = sorted(p.name[: -len(".zarr")] for p in tiny_stores.glob("*.zarr"))
    remote = SensoriumDataModule(root=http_root, mice=mice, frames=20, batch_size=2, seed=3)
    local = SensoriumDataModule(root=str(tiny_stores), mice=mice, frames=20, batch_size=2, seed=3)
    np.testing.assert_array_equal(remote.neurons[mice[0]].unit_ids, local.neurons[mice[0]].unit_ids)
    a, b = next(iter(remote.train_dataloader())), next(iter(local.train_dataloader()))
    assert torch.equal(a["video"], b["video"])
    assert torch.equal(a["responses"], b["responses"])


def test_url_root_needs_mice(http_root: str) -> None:
    with pytest.raises(ValueError, match="data.mice"):
        SensoriumDataModule(root=http_root)
