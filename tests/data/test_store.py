"""MouseStore: windows equal to the release, lazy and fork/pickle-safe handles, the zarr and HTTP read paths."""

from __future__ import annotations

import functools
import http.server
import multiprocessing as mp
import pickle
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from lightning_sensorium.data.store import MouseStore
from tests.conftest import sessions


@pytest.fixture(scope="module")
def store_and_session(tiny_release: Path, tiny_stores: Path) -> tuple[MouseStore, Path]:
    session = sessions(tiny_release)[0]
    return MouseStore(tiny_stores / f"{session.name}.zarr"), session


def _source(session: Path, trial: int, start: int, stop: int) -> dict[str, np.ndarray]:
    """The release's arrays of one trial, time first, frames [start, stop)."""
    out = {}
    for key, dims in (("videos", (2, 0, 1)), ("responses", (1, 0)), ("behavior", (1, 0)), ("pupil_center", (1, 0))):
        out[key] = np.load(session / f"data/{key}/{trial}.npy").transpose(dims)[start:stop]
    gt = session.parent / "ground_truth" / session.name / "rates" / f"{trial}.npy"
    out["rates"] = np.load(gt).T[start:stop]
    return out


def _assert_window(store: MouseStore, session: Path, trial: int, start: int, stop: int) -> None:
    got = store.read(trial, start, stop, rates=True)
    want = _source(session, trial, start, stop)
    valid = max(0, min(stop, int(store.length[trial])) - start)  # frames of the window before the trial's end
    for key, arr in got.items():
        assert arr.shape[0] == stop - start, key
        np.testing.assert_array_equal(arr[:valid], want[key][:valid], err_msg=key)
        assert not arr[valid:].any(), f"{key}: frames past the length are 0"


def test_windows_equal_the_source(store_and_session: tuple[MouseStore, Path]) -> None:
    store, session = store_and_session
    rng = np.random.default_rng(0)
    for _ in range(12):
        trial = int(rng.integers(store.num_trials))
        start = int(rng.integers(0, store.length[trial] - 80))
        _assert_window(store, session, trial, start, start + 80)
    _assert_window(store, session, 0, 0, store.t_pad)  # whole padded trial
    _assert_window(store, session, 1, 7, 7)  # empty window
    window = store.read(2, 10, 30)
    assert window["videos"].shape == (20, 36, 64) and window["videos"].dtype == np.uint8
    assert window["responses"].shape == (20, store.num_neurons) and window["responses"].dtype == np.float32
    assert window["behavior"].shape == window["pupil_center"].shape == (20, 2)


def test_read_checks_its_arguments(store_and_session: tuple[MouseStore, Path]) -> None:
    store, _ = store_and_session
    with pytest.raises(IndexError, match="trial"):
        store.read(store.num_trials, 0, 10)
    with pytest.raises(IndexError, match="frames"):
        store.read(0, 10, store.t_pad + 1)
    with pytest.raises(IndexError, match="frames"):
        store.read(0, -1, 10)


def test_zarr_path_equals_fast_path(store_and_session: tuple[MouseStore, Path]) -> None:
    store, _ = store_and_session
    slow = MouseStore(store.path)
    slow._layout = lambda name: None  # type: ignore[method-assign]  # force reads through the zarr API
    for trial, start, stop in ((0, 0, 80), (5, 100, 299), (7, 250, store.t_pad)):
        a, b = store.read(trial, start, stop, rates=True), slow.read(trial, start, stop, rates=True)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_metadata(store_and_session: tuple[MouseStore, Path]) -> None:
    store, session = store_and_session
    tiers = np.load(session / "meta/trials/tiers.npy")
    np.testing.assert_array_equal(store.trials(["oracle"]), np.flatnonzero(tiers == "oracle"))
    both = store.trials(["train", "final_test_bonus"])
    np.testing.assert_array_equal(both, np.flatnonzero(np.isin(tiers, ["train", "final_test_bonus"])))
    np.testing.assert_array_equal(store.trials("train"), store.trials(["train"]))
    with pytest.raises(ValueError, match="unknown tier"):
        store.trials(["validation"])
    assert store.num_trials == len(tiers) and store.num_neurons == len(store.unit_ids) == store.coordinates.shape[0]
    assert store.statistics["videos"]["mean"].shape == (store.t_pad, 36, 64)
    assert store.statistics["responses"]["std"].shape == (store.t_pad, store.num_neurons)
    assert store.neuron_statistics["normalized"]["mean"].shape == (store.num_neurons,)
    assert store.has_ground_truth and set(store.ground_truth) == {"clip_id", "stimulus_type"}


def test_opening_is_lazy(store_and_session: tuple[MouseStore, Path]) -> None:
    store = MouseStore(store_and_session[0].path)
    assert not store._handles["arrays"]  # the big arrays are not opened until a read
    store.read(0, 0, 10)
    assert {"videos", "responses"} <= set(store._handles["arrays"])


def test_pickling_keeps_paths_not_handles(store_and_session: tuple[MouseStore, Path]) -> None:
    store, _ = store_and_session
    window = store.read(3, 20, 100)
    state = store.__getstate__()
    assert state["_handles"] == {} and state["path"] == store.path
    clone = pickle.loads(pickle.dumps(store))
    for key, arr in clone.read(3, 20, 100).items():
        np.testing.assert_array_equal(arr, window[key], err_msg=key)


def _read_in_child(store: MouseStore, queue: mp.Queue) -> None:
    queue.put(store.read(4, 30, 110)["responses"])


def test_fork_workers_read_the_same(store_and_session: tuple[MouseStore, Path]) -> None:
    store, _ = store_and_session
    expected = store.read(4, 30, 110)["responses"]  # the parent has open handles before forking
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(store, queue))
    child.start()
    got = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    np.testing.assert_array_equal(got, expected)


# ---------------------------------------------------------------------------------------------------- HTTP
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Ignores ``Range`` (sends whole files), like many simple servers."""

    def log_message(self, *args: object) -> None:
        pass


class _RangeHandler(_QuietHandler):
    """Answers ``Range: bytes=a-b`` with 206 and the slice, like object stores do."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        path = Path(self.translate_path(self.path))
        if match is None or not path.is_file():
            return super().do_GET()
        data = path.read_bytes()[int(match[1]) : int(match[2]) + 1]
        self.send_response(206)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        return None


@pytest.fixture(params=[_QuietHandler, _RangeHandler], ids=["no-range", "range"])
def http_root(request: pytest.FixtureRequest, tiny_stores: Path) -> Iterator[str]:
    handler = functools.partial(request.param, directory=str(tiny_stores))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_store_equals_local(http_root: str, store_and_session: tuple[MouseStore, Path]) -> None:
    local, _ = store_and_session
    remote = MouseStore(f"{http_root}/{Path(local.path).name}")
    assert remote.remote and remote.mouse_id == local.mouse_id
    np.testing.assert_array_equal(remote.length, local.length)
    for trial, start, stop in ((0, 0, 80), (6, 120, 200)):
        a, b = remote.read(trial, start, stop, rates=True), local.read(trial, start, stop, rates=True)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    clone = pickle.loads(pickle.dumps(remote))
    np.testing.assert_array_equal(clone.read(1, 5, 9)["videos"], local.read(1, 5, 9)["videos"])
