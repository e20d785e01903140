"""The competition's submission file format: names, schema, reading and validation (``submit`` writes, ``score`` reads).

One brotli-compressed parquet file per test tier, one row per trial (columns: :func:`schema`), exactly what the
official ``df.to_parquet(compression="brotli", engine="pyarrow", index=False)`` of float32 ``.tolist()``
predictions writes (https://github.com/ecker-lab/sensorium_2023, ``sensorium/utility/submission.py``). File names,
zips and checks: docs/evaluation.md, "Submit".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lightning_sensorium.data.layout import SKIP_FRAMES
from lightning_sensorium.data.store import MouseStore

PARQUET_SUFFIX = ".parquet.brotli"

#: The file name the site expects for each test tier.
FILE_NAMES: dict[str, str] = {
    "live_test_main": "predictions_live_main.parquet.brotli",
    "final_test_main": "predictions_final_main.parquet.brotli",
    "live_test_bonus": "predictions_live_test_bonus_ood.parquet.brotli",
    "final_test_bonus": "predictions_final_test_bonus_ood.parquet.brotli",
}
COLUMNS = ("mouse", "trial_indices", "prediction", "neuron_ids")

#: The official starter kit's own output names (``generate_submission``), accepted by ``score``.
_OFFICIAL_NAME = re.compile(
    r"predictions_file_(live_test|final_test)_(main|bonus)_(?:main|ood)_track\.parquet\.brotli$"
)


class SubmissionError(ValueError):
    """A submission that the site would reject or misread (names the file, mouse, trial and problem)."""


def schema() -> Any:
    """The Arrow schema pandas/pyarrow give the official DataFrame: one row per trial.

    * ``mouse`` (string): the session folder name, i.e. the store's mouse id;
    * ``trial_indices`` (int64): the trial's file number ``i`` of ``data/*/i.npy``;
    * ``prediction`` (list<list<double>>): ``(n_neurons, n_frames)``, the frames ``50 … length - 1`` of the official
      cut (``length`` ≤ 300, 249 frames for a natural trial of the release);
    * ``neuron_ids`` (list<uint32>): the store's ``unit_ids``, in the order of the prediction rows.
    """
    import pyarrow as pa

    return pa.schema(
        [
            ("mouse", pa.string()),
            ("trial_indices", pa.int64()),
            ("prediction", pa.list_(pa.list_(pa.float64()))),
            ("neuron_ids", pa.list_(pa.uint32())),
        ]
    )


def tier_of_file(name: str) -> str:
    """The test tier a submission file name stands for (the site's names, or ``generate_submission``'s)."""
    base = Path(name).name
    for tier, expected in FILE_NAMES.items():
        if base == expected:
            return tier
    match = _OFFICIAL_NAME.search(base)
    if match:
        return f"{match.group(1)}_{match.group(2)}"
    raise SubmissionError(
        f"{name}: cannot tell the tier from the file name; expected one of {sorted(FILE_NAMES.values())}"
    )


def check_prediction(where: str, pred: np.ndarray, num_neurons: int, num_frames: int) -> None:
    """Raise :class:`SubmissionError` unless ``pred`` is a finite ``(num_neurons, num_frames)`` array."""
    if pred.ndim != 2 or pred.shape != (num_neurons, num_frames):
        raise SubmissionError(
            f"{where}: prediction has shape {tuple(pred.shape)}, expected ({num_neurons} neurons, {num_frames} frames)"
        )
    bad = ~np.isfinite(pred)
    if bad.any():
        n, f = (int(i) for i in np.argwhere(bad)[0])
        raise SubmissionError(
            f"{where}: {int(bad.sum())} non-finite prediction value(s) (NaN/inf), first at neuron row {n}, frame "
            f"{SKIP_FRAMES + f}"
        )


def scored_frames(length: int, where: str) -> int:
    """Frames a trial of valid ``length`` contributes: ``length - 50`` (the official cut)."""
    frames = int(length) - SKIP_FRAMES
    if frames <= 0:
        raise SubmissionError(f"{where}: the trial has {length} valid frames, none after the {SKIP_FRAMES} unscored")
    return frames


def record_batch(rows: Sequence[tuple[str, int, np.ndarray, np.ndarray]]) -> Any:
    """Arrow columns of ``rows`` = ``[(mouse, trial_index, prediction (N, F), unit_ids (N,))]``."""
    import pyarrow as pa

    n_rows = [r[2].shape[0] for r in rows]
    frames = np.concatenate([np.full(r[2].shape[0], r[2].shape[1], dtype=np.int64) for r in rows])  # (Σ N,)
    values = np.concatenate([r[2].astype(np.float64).ravel() for r in rows])  # row-major (N, F) per trial
    inner = pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(frames)]), pa.int32()), values)
    outer = pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(n_rows)]), pa.int32()), inner)
    ids = np.concatenate([r[3].astype(np.uint32) for r in rows])
    id_lists = pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(n_rows)]), pa.int32()), ids)
    return pa.Table.from_arrays(
        [pa.array([r[0] for r in rows], pa.string()), pa.array([r[1] for r in rows], pa.int64()), outer, id_lists],
        schema=schema(),
    )


# ---------------------------------------------------------------------------------------------------- reading
@dataclass
class SubmissionTable:
    """One submission file opened for checking and scoring (predictions are read one mouse at a time)."""

    name: str
    file: Any  # pyarrow.parquet.ParquetFile
    mouse: list[str]
    trial_indices: list[int]
    neuron_ids: list[Any]  # per row: pyarrow list scalar

    @property
    def mice(self) -> set[str]:
        return set(self.mouse)

    def check_mouse(self, mouse: str, store: MouseStore, rows: np.ndarray) -> None:
        """Raise unless the file has every trial of ``rows`` once, nothing else, and the store's neuron ids."""
        tier = tier_of_file(self.name)
        expected = {int(store.trial_index[r]) for r in rows}
        got = [t for m, t in zip(self.mouse, self.trial_indices, strict=True) if m == mouse]
        seen: set[int] = set()
        for t in got:
            if t in seen:
                raise SubmissionError(f"{self.name}: mouse {mouse}: trial_indices {t} appears twice")
            seen.add(t)
            if t not in expected:
                raise SubmissionError(f"{self.name}: mouse {mouse}: trial_indices {t} is not a {tier} trial")
        missing = sorted(expected - seen)
        if missing:
            raise SubmissionError(
                f"{self.name}: mouse {mouse}: {len(missing)} {tier} trial(s) missing, trial_indices {missing[:10]}"
            )
        ids = np.asarray(store.unit_ids)
        for m, t, row_ids in zip(self.mouse, self.trial_indices, self.neuron_ids, strict=True):
            if m != mouse:
                continue
            values = np.asarray(row_ids.values.to_numpy(zero_copy_only=False) if row_ids.is_valid else [])
            if values.shape != ids.shape or not np.array_equal(values.astype(np.int64), ids.astype(np.int64)):
                raise SubmissionError(
                    f"{self.name}: mouse {mouse}, trial_indices {t}: neuron_ids differ from the store's unit_ids "
                    f"({values.shape[0]} ids, expected {ids.shape[0]} in the order of meta/neurons/unit_ids.npy)"
                )

    def predictions(self, mouse: str, store: MouseStore) -> dict[int, np.ndarray]:
        """``{trial_index: (N, F) float32}`` of one mouse, each checked for shape (F = length - 50) and finiteness."""
        row_of = {int(i): r for r, i in enumerate(store.trial_index)}
        out: dict[int, np.ndarray] = {}
        for batch in self.file.iter_batches(batch_size=8, columns=["mouse", "trial_indices", "prediction"]):
            mice = batch.column(0).to_pylist()
            trials = [_trial_index(v, self.name) for v in batch.column(1).to_pylist()]
            preds = batch.column(2)
            for i, (m, t) in enumerate(zip(mice, trials, strict=True)):
                if m != mouse:
                    continue
                where = f"{self.name}: mouse {mouse}, trial_indices {t}"
                length = int(store.length[row_of[t]])
                out[t] = _prediction_array(preds.slice(i, 1), where, store.num_neurons, scored_frames(length, where))
        return out


def _trial_index(value: Any, name: str) -> int:
    """An int trial index (the official code), or the README's ``'12.npy'`` / ``'12'`` form."""
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        match = re.fullmatch(r"(\d+)(?:\.npy)?", value.strip())
        if match:
            return int(match.group(1))
    raise SubmissionError(f"{name}: trial_indices {value!r} is not a trial number (an int, or '<i>.npy')")


def _prediction_array(cell: Any, where: str, num_neurons: int, num_frames: int) -> np.ndarray:
    """One ``prediction`` cell (a length-1 Arrow slice of list<list<number>>) → checked ``(N, F)`` float32."""
    import pyarrow as pa

    if cell.null_count or not pa.types.is_list(cell.type) or not pa.types.is_list(cell.type.value_type):
        raise SubmissionError(f"{where}: prediction must be a list of per-neuron lists of numbers, got {cell.type}")
    inner = cell.flatten()  # N per-neuron lists
    lengths = inner.value_lengths().to_numpy(zero_copy_only=False)
    if inner.null_count:
        raise SubmissionError(f"{where}: prediction holds a null neuron row")
    if len(inner) != num_neurons or (lengths.size and np.any(lengths != num_frames)):
        shape = (len(inner), sorted(set(lengths.tolist()))[:3])
        raise SubmissionError(
            f"{where}: prediction has {shape[0]} neuron rows of {shape[1]} frames, expected ({num_neurons} neurons, "
            f"{num_frames} frames)"
        )
    values = inner.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    pred = values.reshape(num_neurons, num_frames)  # (N, F)
    check_prediction(where, pred, num_neurons, num_frames)
    return pred


def read_submission_file(source: Any, name: str) -> SubmissionTable:
    """Open one parquet file (path or binary file) and read its small columns; raise on a wrong layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(source)
    except (pa.ArrowInvalid, OSError) as err:
        raise SubmissionError(f"{name}: not a parquet file ({err})") from err
    columns = pf.schema_arrow.names
    missing = [c for c in COLUMNS if c not in columns]
    if missing:
        raise SubmissionError(f"{name}: missing column(s) {missing}; expected {list(COLUMNS)}, found {columns}")
    table = pf.read(columns=["mouse", "trial_indices", "neuron_ids"])
    mice = table.column("mouse").to_pylist()
    if any(not isinstance(m, str) for m in mice):
        raise SubmissionError(f"{name}: column mouse must hold session names (strings)")
    trials = [_trial_index(v, name) for v in table.column("trial_indices").to_pylist()]
    ids_col = table.column("neuron_ids").combine_chunks()
    if not pa.types.is_list(ids_col.type):
        raise SubmissionError(f"{name}: neuron_ids must be a list of ids per row, got {ids_col.type}")
    return SubmissionTable(name, pf, mice, trials, [ids_col[i] for i in range(len(ids_col))])
