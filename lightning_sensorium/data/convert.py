"""Official SENSORIUM 2023 release → one zarr v3 store per mouse (``<out>/<mouse_id>.zarr``): the orchestration.

Sources are read and checked by :mod:`.release` (everything checkable is checked before anything is written), each
mouse is written trial by trial by :mod:`.store_writer` into a temporary sibling ``<out>/.<mouse_id>.zarr.tmp-*``
and renamed into place only when complete (:mod:`lightning_sensorium.atomic`). A re-run on an unchanged source is a
no-op. The store contract is in docs/data.md ("Store contract").
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from lightning_sensorium.atomic import atomic_dir, remove
from lightning_sensorium.data.release import ConversionError, Session, SessionPlan, find_sessions, validate
from lightning_sensorium.data.store_writer import CREATED_BY, FORMAT_VERSION, NotGreyLevels, store_bytes, write_store


def _fingerprint(session: Session) -> str:
    """Cheap identity of a source: every file's path, size and mtime (folders) or CRC-32 (archives)."""
    h = hashlib.sha256(f"format {FORMAT_VERSION}\n".encode())
    for line in session.inventory():
        h.update(line.encode() + b"\n")
    return h.hexdigest()[:32]


def _existing(path: Path) -> dict[str, Any] | None:
    """The attributes of an existing store of ours, or None (not a zarr group, or not written by us)."""
    try:
        attrs = dict(zarr.open_group(path, mode="r").attrs)
    except Exception:  # noqa: BLE001 - anything unreadable is "not ours"
        return None
    return attrs if attrs.get("created_by") == CREATED_BY or "format_version" in attrs else None


def _pending(sessions: list[Session], out: Path, overwrite: bool) -> list[tuple[Session, Path, str]]:
    """The sessions to (re)write: ``(session, destination, fingerprint)``; up-to-date ones are skipped."""
    todo = []
    for session in sessions:
        dest = out / f"{session.name}.zarr"
        fingerprint = _fingerprint(session)
        if dest.exists() or dest.is_symlink():
            attrs = _existing(dest)
            if attrs is not None and attrs.get("source_fingerprint") == fingerprint:
                print(f"{dest}: up to date")
                session.close()
                continue
            version = None if attrs is None else attrs.get("format_version")
            stale = attrs is not None and version != FORMAT_VERSION and attrs.get("source") == session.where
            if stale:  # ours, from the same source path, older layout: rebuild without asking
                print(f"{dest}: rebuilding (format {version} → {FORMAT_VERSION})")
            elif not overwrite:
                why = (
                    "is not a lightning_sensorium store"
                    if attrs is None
                    else f"was built from another source or format version (source {attrs.get('source')}, "
                    f"format {version}; this converter writes format {FORMAT_VERSION})"
                )
                raise ConversionError(f"{dest}: output already exists and {why}; replace it with the overwrite option")
        todo.append((session, dest, fingerprint))
    return todo


def _write_atomically(session: Session, plan: SessionPlan, dest: Path, fingerprint: str, bar: Any) -> None:
    """Write a temporary sibling of ``dest``, then rename it to ``dest`` (replacing an old store last)."""
    task = bar.add_task(f"convert {session.name}", total=plan.num_trials) if bar is not None else None

    def tick() -> None:
        if bar is not None:
            bar.update(task, advance=1)

    try:
        with atomic_dir(dest, overwrite=True, needed=store_bytes(plan)) as tmp:
            try:
                write_store(session, plan, tmp, np.uint8, fingerprint, tick)
            except NotGreyLevels:  # the videos are not integer grey levels after all: keep them as float32
                remove(tmp)
                if bar is not None:
                    bar.reset(task)
                write_store(session, plan, tmp, np.float32, fingerprint, tick)
    finally:
        session.close()


def convert(
    sources: Sequence[str | Path], out_dir: str | Path, *, overwrite: bool = False, progress: bool = True
) -> list[Path]:
    """Convert release sessions to ``out_dir/<mouse_id>.zarr`` stores; returns the store paths, in source order.

    Raises ConversionError (a ValueError) on bad input; nothing is then left in ``out_dir`` for the failing mouse
    (mice converted before it are complete stores). An existing store built from the same, unchanged source is
    kept ("up to date"); one of ours built from the same source path in an older format version is rebuilt; any
    other existing ``<mouse_id>.zarr`` is an error unless ``overwrite``.
    """
    sessions = find_sessions(sources)
    if not sessions:
        raise ConversionError("no session given")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out}: exists and is not a folder")
    results = [out / f"{s.name}.zarr" for s in sessions]
    created = not out.exists()
    try:
        todo = _pending(sessions, out, overwrite)
        plans = [validate(s) for s, _, _ in todo]  # everything checkable is checked before anything is written
        if not todo:
            return results
        out.mkdir(parents=True, exist_ok=True)
        bar_ctx: Any = contextlib.nullcontext()
        if progress:
            from rich.progress import Progress

            bar_ctx = Progress()
        with bar_ctx as bar:
            for (session, dest, fingerprint), plan in zip(todo, plans, strict=True):
                _write_atomically(session, plan, dest, fingerprint, bar)
    except BaseException:
        if created and out.exists():
            with contextlib.suppress(OSError):
                out.rmdir()  # only if still empty: a folder created for nothing
        raise
    finally:
        for session in sessions:
            session.close()
    return results
