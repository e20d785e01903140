"""Write-then-rename: complete or absent, nothing left behind, an old destination kept on failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lightning_sensorium.atomic import atomic_dir, place, remove, temporary_sibling, write_text_atomic


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
