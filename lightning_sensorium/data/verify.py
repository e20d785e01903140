"""``lightning-sensorium verify``: read every chunk and statistic of converted stores and say what is damaged.

Checks, per store: the metadata and the small arrays open (missing or corrupt chunks, see
:class:`~lightning_sensorium.data.store.MouseStore`); lengths lie in ``[1, t_pad]``; every trial chunk of ``videos``,
``responses`` (hidden trials excepted) and the ground-truth ``rates`` is present, full-sized, finite and matches the
CRC-32 recorded at conversion (store format ≥ 4); behaviour, pupil centre and the statistics hold no Inf, the
per-neuron statistics no NaN either.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lightning_sensorium.data.store import MouseStore, StoreError
from lightning_sensorium.data.store_writer import chunk_checksum

#: Problems listed per store; the rest are counted.
MAX_LISTED = 20


@dataclass
class StoreReport:
    """What :func:`verify_store` found in one store."""

    path: str
    problems: list[str] = field(default_factory=list)
    chunks: int = 0  # trial chunks read
    checksums: bool = False  # whether checksums were recorded and compared
    unlisted: int = 0  # problems beyond MAX_LISTED

    def add(self, problem: str) -> None:
        if len(self.problems) < MAX_LISTED:
            self.problems.append(problem)
        else:
            self.unlisted += 1

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_small(store: MouseStore, report: StoreReport) -> None:
    bad = np.flatnonzero((store.length < 1) | (store.length > store.t_pad))
    if bad.size:
        report.add(f"length: {bad.size} trial(s) outside [1, {store.t_pad}] (first: trial {int(bad[0])})")
    for name, values in (("behavior", store.behavior), ("pupil_center", store.pupil_center)):
        if not np.isfinite(values).all():
            trial = int(np.flatnonzero(~np.isfinite(values).all(axis=(1, 2)))[0])
            report.add(f"{name}: non-finite values (first in trial {trial})")
    for key, stats in store.statistics.items():
        for stat, values in stats.items():
            if np.isinf(values).any():  # NaN is allowed: frames that no train trial has
                report.add(f"statistics/{key}/{stat}: Inf values")
    for scale, stats in store.neuron_statistics.items():
        for stat, values in stats.items():
            if not np.isfinite(values).all():
                report.add(f"statistics/responses_per_neuron/{scale}/{stat}: non-finite values")


def verify_store(path: str | Path, advance: Callable[[], None] | None = None) -> StoreReport:
    """Check one store (``advance()`` after each trial); never raises for damage, reports it."""
    try:
        store = MouseStore(path)
    except (StoreError, FileNotFoundError) as err:
        return StoreReport(str(path), [str(err)])
    return _verify_open(store, str(path), advance)


def _verify_open(store: MouseStore, path: str, advance: Callable[[], None] | None) -> StoreReport:
    report = StoreReport(path)
    _check_small(store, report)
    recorded = store.checksums
    report.checksums = bool(recorded)
    for trial in range(store.num_trials):
        try:
            arrays = store.read(trial, 0, store.t_pad, rates=store.has_ground_truth)
        except StoreError as err:
            report.add(str(err))
        else:
            for name, data in arrays.items():
                if name in ("behavior", "pupil_center") or (name == "responses" and store.hidden[trial]):
                    continue
                report.chunks += 1
                if data.dtype.kind == "f" and not np.isfinite(data).all():
                    report.add(f"{name}: non-finite values in trial {trial}")
                if name in recorded and chunk_checksum(data) != int(recorded[name][trial]):
                    report.add(f"{name}: trial {trial}'s chunk does not match its checksum (changed since conversion)")
        if advance is not None:
            advance()
    return report


def verify(paths: Sequence[str | Path], progress: bool = True) -> list[StoreReport]:
    """Check several stores, one after the other, with one progress bar over their trials (each store opened once)."""
    from rich.progress import Progress

    opened: list[MouseStore | StoreReport] = []
    for p in paths:
        try:
            opened.append(MouseStore(p))
        except (StoreError, FileNotFoundError) as err:
            opened.append(StoreReport(str(p), [str(err)]))
    total = sum(s.num_trials for s in opened if isinstance(s, MouseStore))
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("verifying", total=total)
        return [
            _verify_open(s, str(p), lambda: bar.advance(task)) if isinstance(s, MouseStore) else s
            for p, s in zip(paths, opened, strict=True)
        ]
