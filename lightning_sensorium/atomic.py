"""Write-then-rename: a file or folder appears at its destination complete, or not at all.

Every writer of the package (stores, prediction stores, submissions, reports, synthetic mice, exported configs)
writes into a temporary sibling ``.<name>.tmp-<host>-<pid>-<random>`` of its destination and renames it into place
once complete; on error the temporary is removed and an existing destination is left as it was. A process killed
mid-write cannot remove its temporary: the next writer of the same destination removes those of dead processes of
this host. A full disk is one :class:`DiskFullError` naming the path. Imports nothing from the package.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

#: This machine in temporary names (a hash: host names hold any character), so that a shared file system's other
#: hosts' temporaries are never taken for this host's dead ones.
_HOST = f"{zlib.crc32(socket.gethostname().encode()):08x}"


class DiskFullError(OSError):
    """The file system of a destination has not enough free space (raised before writing where the size is known)."""

    def __str__(self) -> str:
        return str(self.strerror)  # the message alone, without "[Errno 28]"


def _sibling(dest: Path, kind: str) -> Path:
    return dest.parent / f".{dest.name}.{kind}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(dest: str | Path) -> list[Path]:
    """Remove the temporaries (``.tmp-``/``.old-`` siblings) of ``dest`` left by dead processes of this host; returns
    them. Live processes' temporaries, other hosts' and anything not named by this module are left alone."""
    dest = Path(dest)
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.(?:tmp|old)-{_HOST}-(\d+)-[0-9a-f]{{8}}$")
    removed = []
    if dest.parent.is_dir():
        for sibling in dest.parent.iterdir():
            match = pattern.match(sibling.name)
            if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
                remove(sibling)
                removed.append(sibling)
    return removed


def check_free_space(dest: str | Path, needed: int) -> None:
    """Raise :class:`DiskFullError` when the file system of ``dest`` has less than ``needed`` bytes free."""
    dest = Path(dest)
    folder = next(p for p in (dest.parent, *dest.parents) if p.exists())
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DiskFullError(
            errno.ENOSPC, f"{dest}: needs {_gib(needed)} on {folder}, which has {_gib(free)} free; free some space"
        )


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


@contextlib.contextmanager
def _disk_full_as_one_error(dest: Path) -> Iterator[None]:
    try:
        yield
    except OSError as err:
        if err.errno != errno.ENOSPC or isinstance(err, DiskFullError):
            raise
        free = shutil.disk_usage(dest.parent).free if dest.parent.exists() else 0
        raise DiskFullError(errno.ENOSPC, f"{dest}: the disk is full ({_gib(free)} free); free some space") from err


def temporary_sibling(dest: str | Path, *, directory: bool = True) -> Path:
    """Create an empty folder (or file) ``.<name>.tmp-<host>-<pid>-<random>`` beside ``dest`` (parents made) and
    return it, after removing the temporaries of ``dest`` that dead processes left (:func:`remove_stale`)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(dest)
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
def atomic_dir(dest: str | Path, *, overwrite: bool = True, needed: int | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``dest``; :func:`place` it at ``dest`` when the block succeeds.

    If the block raises, the temporary folder is removed and ``dest`` is untouched. With ``overwrite=False`` an
    existing ``dest`` raises FileExistsError before anything is written; with ``needed`` (bytes) too little free space
    raises :class:`DiskFullError` before anything is written, and a disk that fills up during the block raises it too.
    """
    dest = Path(dest)
    if not overwrite and os.path.lexists(dest):
        raise FileExistsError(f"{dest} already exists")
    if needed is not None:
        remove_stale(dest)  # their space counts as free
        check_free_space(dest, needed)
    tmp = temporary_sibling(dest)
    try:
        with _disk_full_as_one_error(dest):
            yield tmp
            place(tmp, dest, overwrite=overwrite)
    except BaseException:
        remove(tmp)
        raise


@contextlib.contextmanager
def atomic_file(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling file of ``dest`` to write; :func:`place` it at ``dest`` when the block succeeds
    (replacing an old file). If the block raises, the temporary is removed and ``dest`` is untouched; a disk that
    fills up raises :class:`DiskFullError`."""
    dest = Path(dest)
    tmp = temporary_sibling(dest, directory=False)
    try:
        with _disk_full_as_one_error(dest):
            yield tmp
            place(tmp, dest)
    except BaseException:
        remove(tmp)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling file (parent folders made); replaces an old file."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
