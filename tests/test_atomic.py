"""Write-then-rename: complete or absent, nothing left behind, an old destination kept on failure."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lightning_sensorium.atomic import DiskFullError, atomic_dir, place, remove, temporary_sibling, write_text_atomic


class Boom(Exception):
    pass


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_temporary_sibling_is_hidden_beside_the_destination(tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "store.zarr"
    tmp = temporary_sibling(dest)
    assert tmp.parent == dest.parent and tmp.is_dir() and not any(tmp.iterdir())
    assert tmp.name.startswith(".store.zarr.tmp-")
    other = temporary_sibling(dest, directory=False)
    assert other.is_file() and other != tmp


def test_atomic_dir_places_the_folder_on_success(tmp_path: Path) -> None:
    dest = tmp_path / "out.zarr"
    with atomic_dir(dest) as tmp:
        (tmp / "a").write_text("1")
        assert not dest.exists()  # nothing at the destination while writing
    assert _names(tmp_path) == ["out.zarr"]
    assert (dest / "a").read_text() == "1"


def test_atomic_dir_replaces_an_existing_folder(tmp_path: Path) -> None:
    dest = tmp_path / "out.zarr"
    dest.mkdir()
    (dest / "old").write_text("old")
    with atomic_dir(dest) as tmp:
        (tmp / "new").write_text("new")
    assert _names(dest) == ["new"]
    assert _names(tmp_path) == ["out.zarr"]  # the old folder is gone, no trash left


def test_atomic_dir_replaces_a_file_and_a_link(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_text("keep")
    link = tmp_path / "link.zarr"
    link.symlink_to(target)
    with atomic_dir(link) as tmp:
        (tmp / "x").write_text("x")
    assert not link.is_symlink() and _names(link) == ["x"]
    assert (target / "keep").read_text() == "keep"  # the link is replaced, not what it pointed to
    file = tmp_path / "file.zarr"
    file.write_text("a file")
    with atomic_dir(file) as tmp:
        (tmp / "y").write_text("y")
    assert _names(file) == ["y"]


def _half_write(dest: Path, error: BaseException) -> None:
    with atomic_dir(dest) as tmp:
        (tmp / "half").write_text("half")
        raise error


def test_error_leaves_nothing_and_keeps_the_old_destination(tmp_path: Path) -> None:
    dest = tmp_path / "out.zarr"
    with pytest.raises(Boom):
        _half_write(dest, Boom())
    assert _names(tmp_path) == []
    dest.mkdir()
    (dest / "old").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        _half_write(dest, KeyboardInterrupt())
    assert _names(tmp_path) == ["out.zarr"] and (dest / "old").read_text() == "old"


def test_no_overwrite_refuses_before_writing(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(FileExistsError, match="out already exists"), atomic_dir(dest, overwrite=False):
        pytest.fail("the block must not run")
    tmp = temporary_sibling(dest)
    with pytest.raises(FileExistsError):
        place(tmp, dest, overwrite=False)
    assert tmp.is_dir()  # place does not clean up: its caller owns the temporary
    remove(tmp)
    assert _names(tmp_path) == ["out"]


def test_failed_rename_puts_the_old_destination_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "out.zarr"
    dest.mkdir()
    (dest / "old").write_text("old")
    tmp = temporary_sibling(dest)
    real = os.replace
    calls: list[tuple[str, str]] = []

    def flaky(src: str | Path, dst: str | Path) -> None:
        calls.append((Path(src).name, Path(dst).name))
        if Path(src) == tmp:
            raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError, match="disk full"):
        place(tmp, dest)
    monkeypatch.undo()
    assert len(calls) == 3  # dest aside, tmp in (fails), dest back
    assert (dest / "old").read_text() == "old"
    remove(tmp)
    assert _names(tmp_path) == ["out.zarr"]


def test_write_text_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "new" / "results.json"
    write_text_atomic(path, "one")
    assert path.read_text() == "one"
    write_text_atomic(path, "two")
    assert path.read_text() == "two" and _names(path.parent) == ["results.json"]

    def failing(self: Path, text: str) -> int:
        Path.write_bytes(self, text[:1].encode())  # half written, then the disk fails
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", failing)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(path, "three")
    monkeypatch.undo()
    assert path.read_text() == "two" and _names(path.parent) == ["results.json"]


def test_remove(tmp_path: Path) -> None:
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "f").write_text("f")
    (tmp_path / "l").symlink_to(tmp_path / "d")
    for name in ("l", "d", "f", "missing"):
        remove(tmp_path / name)
    assert _names(tmp_path) == []


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path: Path) -> None:
    """A killed writer leaves its temporary; the next writer of the same destination removes it, and only it."""
    dest = tmp_path / "store.zarr"
    live = temporary_sibling(dest)  # this process: alive
    host = live.name.split("-")[1]
    dead = tmp_path / f".store.zarr.tmp-{host}-{_dead_pid()}-0123abcd"
    dead.mkdir()
    (dead / "big").write_bytes(b"x" * 100)
    other_host = tmp_path / f".store.zarr.tmp-ffffffff-{_dead_pid()}-0123abcd"  # another host's: not ours to judge
    other_host.mkdir()
    unrelated = tmp_path / ".other.zarr.tmp-x"
    unrelated.mkdir()
    with atomic_dir(dest) as tmp:
        (tmp / "a").write_text("1")
    assert not dead.exists()
    assert live.exists() and other_host.exists() and unrelated.exists()
    assert (dest / "a").read_text() == "1"


def test_too_little_free_space_is_one_error_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_sensorium import atomic

    dest = tmp_path / "store.zarr"
    with pytest.raises(atomic.DiskFullError) as err, atomic_dir(dest, needed=2**62):
        raise AssertionError("the block must not run")
    assert str(err.value).startswith(f"{dest}: needs 4294967296.0 GiB on {tmp_path}, which has ")
    assert _names(tmp_path) == []


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (root on Linux); skipped where it cannot be mounted."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_disk_that_fills_up_is_one_error_and_leaves_nothing(tiny_disk: Path) -> None:
    dest = tiny_disk / "out.zarr"
    full = rf"^{dest}: the disk is full \(0 MiB free\); free some space$"
    with pytest.raises(DiskFullError, match=full), atomic_dir(dest) as tmp:
        (tmp / "big").write_bytes(b"x" * 2**21)
    assert _names(tiny_disk) == []


def test_convert_on_a_full_disk_says_so_in_one_line(
    tiny_release: Path, tiny_disk: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_sensorium.cli import main
    from tests.conftest import sessions

    assert main(["convert", str(sessions(tiny_release)[0]), "--out", str(tiny_disk), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "convert: error:" in err and "needs" in err and "free some space" in err
    assert _names(tiny_disk) == []


def _kill_once_a_temporary_appears(code: str, folder: Path, settle: float = 1.0) -> None:
    """Run ``code`` in a Python process, SIGKILL it ``settle`` seconds after a ``.tmp-`` temporary shows up in
    ``folder`` (the writer is then inside its writes), and wait for it."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parents[1])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (folder.exists() and any(".tmp-" in p.name for p in folder.iterdir())):
        time.sleep(0.1)
    time.sleep(settle)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_a_convert_killed_mid_write_is_cleaned_up_by_the_next_run(tiny_release: Path, tmp_path: Path) -> None:
    """SIGKILL during `convert`: no store appears, only its temporary; the next `convert` removes that temporary
    (its process is dead) and writes the store."""
    from lightning_sensorium.data.convert import convert
    from tests.conftest import sessions

    session, out = sessions(tiny_release)[0], tmp_path / "out"
    code = (
        "import time\n"
        "from lightning_sensorium.data import store_writer\n"
        "from lightning_sensorium.data.convert import convert\n"
        "original = store_writer.check_trial_values\n"
        "def slow(*args):\n"
        "    time.sleep(0.2)\n"
        "    return original(*args)\n"
        "store_writer.check_trial_values = slow\n"
        f"convert([{str(session)!r}], {str(out)!r}, progress=False)\n"
    )
    _kill_once_a_temporary_appears(code, out)
    left = [p.name for p in out.iterdir()]
    assert len(left) == 1 and ".tmp-" in left[0]  # the temporary, no store
    (store,) = convert([session], out, progress=False)
    assert _names(out) == [store.name]


def test_infer_on_a_full_disk_says_so_in_one_line(
    tiny_stores: Path, tiny_disk: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """The predictions outgrow the disk while they stream: one line, exit 2, no temporary left."""
    from lightning_sensorium.cli import main
    from tests.test_evaluate import fitted

    ckpt = fitted(tmp_path_factory, tiny_stores)["checkpoints"][0]
    out = tiny_disk / "preds.zarr"
    args = ["infer", "--ckpt_path", ckpt, "--out", str(out), "--tiers", "final_test_main", "--accelerator", "cpu"]
    assert main([*args, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lightning-sensorium infer: error: ") and err[-1].endswith(
        "the disk is full; free some space"
    )
    assert _names(tiny_disk) == []


def test_an_infer_killed_mid_write_is_cleaned_up_by_the_next_run(
    tiny_stores: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """SIGKILL during `infer`: no prediction store appears, only its temporary; the next `infer` to the same
    destination removes it and writes the store."""
    from lightning_sensorium.cli import main
    from tests.test_evaluate import fitted

    ckpt = fitted(tmp_path_factory, tiny_stores)["checkpoints"][0]
    out = tmp_path / "preds.zarr"
    args = ["infer", "--ckpt_path", ckpt, "--out", str(out), "--tiers", "final_test_main", "--accelerator", "cpu"]
    code = (
        "import sys, time\n"
        "from lightning_sensorium.callbacks.prediction_writer import ZarrPredictionWriter\n"
        "from lightning_sensorium.cli import main\n"
        "original = ZarrPredictionWriter.write\n"
        "def slow(self, *args):\n"
        "    original(self, *args)\n"
        "    time.sleep(0.5)\n"
        "ZarrPredictionWriter.write = slow\n"
        f"main({[*args, '--quiet']!r})\n"
    )
    _kill_once_a_temporary_appears(code, tmp_path)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".preds.zarr.tmp-")]
    assert not out.exists()
    assert main([*args, "--quiet"]) == 0
    assert out.is_dir() and not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
