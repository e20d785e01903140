"""Write-then-rename: a file or folder appears at its destination complete, or not at all.

Every writer of the package (stores, prediction stores, submissions, reports, synthetic mice, exported configs)
writes into a temporary sibling ``.<name>.tmp-<random>`` of its destination and renames it into place once
complete; on error the temporary is removed and an existing destination is left as it was. The sibling is on the
same file system, so the rename is atomic. Imports nothing from the package: every layer may use it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def _sibling(dest: Path, kind: str) -> Path:
    return dest.parent / f".{dest.name}.{kind}-{uuid.uuid4().hex[:8]}"


def temporary_sibling(dest: str | Path, *, directory: bool = True) -> Path:
    """Create an empty folder (or file) ``.<name>.tmp-<random>`` beside ``dest`` (parents made) and return it."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(dest, "tmp")
    if directory:
        tmp.mkdir()
    else:
        tmp.touch(exist_ok=False)
    return tmp


def remove(path: str | Path) -> None:
    """Remove a file, a link (not its target) or a folder tree; nothing if absent."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync(path: Path) -> None:
    """Flush a file, or every file and folder of a tree, to disk (folders: best effort, not every OS opens them)."""
    if path.is_symlink():
        return
    if path.is_file():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    for dirpath, _, files in os.walk(path):
        for name in files:
            _fsync(Path(dirpath) / name)
        _fsync_folder(Path(dirpath))


def _fsync_folder(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def place(tmp: str | Path, dest: str | Path, *, overwrite: bool = True) -> Path:
    """Flush ``tmp`` to disk and rename it to ``dest``; returns ``dest``.

    An existing ``dest`` (file, link or folder) raises FileExistsError unless ``overwrite``; then a file replaces a
    file in one rename, and anything else is swapped: ``dest`` is renamed aside, ``tmp`` renamed in (``dest`` is
    put back if that fails), and the old one removed last.
    """
    tmp, dest = Path(tmp), Path(dest)
    _fsync(tmp)
    exists = os.path.lexists(dest)
    if exists and not overwrite:
        raise FileExistsError(f"{dest} already exists")
    if not exists or (tmp.is_file() and not dest.is_dir()):
        os.replace(tmp, dest)
    else:
        trash = _sibling(dest, "old")
        os.replace(dest, trash)
        try:
            os.replace(tmp, dest)
        except BaseException:
            os.replace(trash, dest)
            raise
        remove(trash)
    _fsync_folder(dest.parent)
    return dest


@contextlib.contextmanager
def atomic_dir(dest: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``dest``; :func:`place` it at ``dest`` when the block succeeds.

    If the block raises, the temporary folder is removed and ``dest`` is untouched. With ``overwrite=False`` an
    existing ``dest`` raises FileExistsError before anything is written.
    """
    dest = Path(dest)
    if not overwrite and os.path.lexists(dest):
        raise FileExistsError(f"{dest} already exists")
    tmp = temporary_sibling(dest)
    try:
        yield tmp
        place(tmp, dest, overwrite=overwrite)
    except BaseException:
        remove(tmp)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling file (parent folders made); replaces an old file."""
    path = Path(path)
    tmp = temporary_sibling(path, directory=False)
    try:
        tmp.write_text(text)
        place(tmp, path)
    except BaseException:
        remove(tmp)
        raise
