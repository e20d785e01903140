"""`lightning-sensorium submit`: the competition's parquet files and zips, validated before anything is written.

Format (data-format.md §4; https://github.com/ecker-lab/sensorium_2023 ``sensorium/utility/submission.py`` and
README): one parquet file per test tier, brotli-compressed, one row per trial with the columns

* ``mouse`` (string): the session folder name, i.e. the store's mouse id;
* ``trial_indices`` (int64): the trial's file number ``i`` of ``data/*/i.npy``;
* ``prediction`` (list<list<double>>): ``(n_neurons, n_frames)``, the frames ``50 … length - 1`` of the official
  cut (``length`` ≤ 300, 249 frames for a natural trial of the release);
* ``neuron_ids`` (list<uint32>): the store's ``unit_ids``, in the order of the prediction rows;

exactly what the official ``df.to_parquet(compression="brotli", engine="pyarrow", index=False)`` of float32
``.tolist()`` predictions writes (pyarrow writes it here, row group by row group, so memory stays bounded).
Main track: ``predictions_live_main.parquet.brotli`` + ``predictions_final_main.parquet.brotli`` in one zip, at its
root; bonus track: ``predictions_live_test_bonus_ood.parquet.brotli`` and
``predictions_final_test_bonus_ood.parquet.brotli``, zipped separately (the site's upload size limit).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lightning_sensorium.data.layout import SKIP_FRAMES
from lightning_sensorium.data.store import MouseStore

log = logging.getLogger(__name__)

PARQUET_SUFFIX = ".parquet.brotli"

#: The file name the site expects for each test tier.
FILE_NAMES: dict[str, str] = {
    "live_test_main": "predictions_live_main.parquet.brotli",
    "final_test_main": "predictions_final_main.parquet.brotli",
    "live_test_bonus": "predictions_live_test_bonus_ood.parquet.brotli",
    "final_test_bonus": "predictions_final_test_bonus_ood.parquet.brotli",
}
#: The tiers of each track.
TRACK_TIERS: dict[str, tuple[str, str]] = {
    "main": ("live_test_main", "final_test_main"),
    "bonus": ("live_test_bonus", "final_test_bonus"),
}
#: Zips to upload: main = both files in one; bonus = one per stage (live, final).
ZIP_NAMES: dict[str, dict[str, tuple[str, ...]]] = {
    "main": {"submission_main.zip": ("live_test_main", "final_test_main")},
    "bonus": {
        "submission_live_test_bonus.zip": ("live_test_bonus",),
        "submission_final_test_bonus.zip": ("final_test_bonus",),
    },
}
COLUMNS = ("mouse", "trial_indices", "prediction", "neuron_ids")

#: The official starter kit's own output names (``generate_submission``), accepted by ``score``.
_OFFICIAL_NAME = re.compile(
    r"predictions_file_(live_test|final_test)_(main|bonus)_(?:main|ood)_track\.parquet\.brotli$"
)


class SubmissionError(ValueError):
    """A submission that the site would reject or misread (names the file, mouse, trial and problem)."""


def schema() -> Any:
    """The Arrow schema pandas/pyarrow give the official DataFrame (see module docstring)."""
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


def _record_batch(rows: Sequence[tuple[str, int, np.ndarray, np.ndarray]]) -> Any:
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


class SubmissionBuilder:
    """Validates trial predictions as they come and writes the submission files atomically.

    Everything goes to a temporary folder beside ``out``; :meth:`finish` checks that every trial of every tier is
    there once, then moves the parquet files and zips into ``out``. Any error leaves ``out`` untouched.

    Args:
        out: output folder.
        stores: the mice to submit, by id.
        track: ``main`` or ``bonus``.
        scale_by_precision: multiply predictions by the official per-frame response precision (for models trained
            on raw responses, e.g. DwiseNeuro; the competition scores raw responses × precision).
        flush_rows: trials buffered before a parquet row group is written.
    """

    def __init__(
        self,
        out: str | Path,
        stores: Mapping[str, MouseStore],
        track: Literal["main", "bonus"] = "main",
        scale_by_precision: bool = False,
        flush_rows: int = 8,
    ) -> None:
        if track not in TRACK_TIERS:
            raise SubmissionError(f"--track {track!r}: expected one of {sorted(TRACK_TIERS)}")
        self.out, self.track, self.flush_rows = Path(out), track, flush_rows
        self.stores = dict(stores)
        self.tiers = TRACK_TIERS[track]
        self.expected: dict[tuple[str, str], set[int]] = {}
        for tier in self.tiers:
            for mouse, store in self.stores.items():
                rows = store.trials(tier)
                if rows.size:
                    self.expected[tier, mouse] = {int(r) for r in rows}
        if not any(t == tier for t, _ in self.expected for tier in self.tiers):
            raise SubmissionError(f"no mouse of the data has {' or '.join(self.tiers)} trials")
        self.seen: dict[tuple[str, str], set[int]] = {k: set() for k in self.expected}
        self.precision: dict[str, np.ndarray] = {}
        if scale_by_precision:
            from lightning_sensorium.data.normalization import response_precision

            self.precision = {m: response_precision(s.statistics["responses"]["std"]) for m, s in self.stores.items()}
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", dir=self.out.parent))
        self.writers: dict[str, Any] = {}
        self.buffers: dict[str, list[tuple[str, int, np.ndarray, np.ndarray]]] = {t: [] for t in self.tiers}

    def add(self, mouse: str, tier: str, trial: int, prediction: np.ndarray, length: int) -> None:
        """One trial: ``prediction (N, T ≥ length)`` for all frames (store row ``trial``), NaN allowed before 50."""
        trial = int(trial)
        store = self.stores.get(mouse)
        where = f"{FILE_NAMES.get(tier, tier)}: mouse {mouse}"
        if store is None or (tier, mouse) not in self.expected:
            raise SubmissionError(f"{where}: not a {self.track}-track tier/mouse of this submission")
        index = int(store.trial_index[trial])
        where = f"{where}, trial_indices {index}"
        if trial not in self.expected[tier, mouse]:
            raise SubmissionError(f"{where}: not a {tier} trial")
        if trial in self.seen[tier, mouse]:
            raise SubmissionError(f"{where}: predicted twice")
        if int(length) != int(store.length[trial]):
            raise SubmissionError(f"{where}: {length} frames predicted, the trial has {int(store.length[trial])}")
        frames = scored_frames(int(length), where)
        pred = np.asarray(prediction, dtype=np.float32)
        if pred.ndim != 2 or pred.shape[1] < int(length):
            raise SubmissionError(f"{where}: prediction {tuple(pred.shape)} does not cover the {length} frames")
        cols = pred[:, SKIP_FRAMES : int(length)]  # (N, length - 50): the official cut
        if mouse in self.precision:
            cols = cols * self.precision[mouse][SKIP_FRAMES : int(length)].T  # (T, N) -> (N, T)
        check_prediction(where, cols, store.num_neurons, frames)
        self.seen[tier, mouse].add(trial)
        self.buffers[tier].append((mouse, index, np.ascontiguousarray(cols, dtype=np.float32), store.unit_ids))
        if len(self.buffers[tier]) >= self.flush_rows:
            self._flush(tier)

    def _flush(self, tier: str) -> None:
        import pyarrow.parquet as pq

        rows = self.buffers[tier]
        if not rows:
            return
        if tier not in self.writers:
            self.writers[tier] = pq.ParquetWriter(self.tmp / FILE_NAMES[tier], schema(), compression="brotli")
        self.writers[tier].write_table(_record_batch(rows))
        self.buffers[tier] = []

    def finish(self) -> list[Path]:
        """Check completeness, close the files, zip them, move everything into ``out``; returns the written paths."""
        try:
            for (tier, mouse), rows in self.expected.items():
                missing = sorted(rows - self.seen[tier, mouse])
                if missing:
                    ids = [int(self.stores[mouse].trial_index[r]) for r in missing]
                    raise SubmissionError(
                        f"{FILE_NAMES[tier]}: mouse {mouse}: {len(ids)} {tier} trial(s) without prediction, "
                        f"trial_indices {ids[:10]}"
                    )
            for tier in self.tiers:
                self._flush(tier)
            for writer in self.writers.values():
                writer.close()
            written = [self.tmp / FILE_NAMES[t] for t in self.tiers if t in self.writers]
            for zip_name, tiers in ZIP_NAMES[self.track].items():
                members = [self.tmp / FILE_NAMES[t] for t in tiers if t in self.writers]
                if not members:
                    continue
                # Parquet is brotli-compressed already: store, do not deflate again. Files at the zip's root.
                with zipfile.ZipFile(self.tmp / zip_name, "w", compression=zipfile.ZIP_STORED) as zf:
                    for m in members:
                        zf.write(m, arcname=m.name)
                written.append(self.tmp / zip_name)
        except BaseException:
            self.abort()
            raise
        self.out.mkdir(parents=True, exist_ok=True)
        final = []
        for path in written:
            os.replace(path, self.out / path.name)
            final.append(self.out / path.name)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return final

    def abort(self) -> None:
        """Drop everything written so far."""
        for writer in self.writers.values():
            with contextlib.suppress(Exception):  # best effort while cleaning up after another error
                writer.close()
        self.writers.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _submission_writer(builder: SubmissionBuilder) -> Any:
    """A Lightning prediction writer that hands every predicted trial to ``builder``."""
    from lightning_sensorium.callbacks.prediction_writer import BatchSink

    def sink(prediction: Any, batch: Any) -> None:
        pred = prediction["prediction"].float().cpu().numpy()  # (B, N, T)
        for b, (trial, length) in enumerate(zip(batch["trial"].tolist(), batch["length"].tolist(), strict=True)):
            builder.add(batch["mouse_id"], batch["tier"], trial, pred[b], length)

    return BatchSink(sink, on_error=builder.abort)


def submit(
    ckpt_paths: Sequence[str | Path],
    out: str | Path,
    *,
    data: dict[str, Any] | None = None,
    track: Literal["main", "bonus"] = "main",
    scale_by_precision: bool = False,
    accelerator: str = "auto",
    progress: bool = True,
) -> list[Path]:
    """Predict every test trial of ``track`` with the (ensemble of) checkpoint(s) and write the submission."""
    from lightning_sensorium.ensemble import load_ensemble
    from lightning_sensorium.prediction import run_prediction

    if track not in TRACK_TIERS:
        raise SubmissionError(f"--track {track!r}: expected one of {sorted(TRACK_TIERS)}")
    model, dm = load_ensemble(ckpt_paths, data)
    if scale_by_precision and dm.normalization == "official":
        warnings.warn(
            "--scale-by-precision with a model trained on official (precision-scaled) responses scales twice; "
            "it is meant for models trained with data.normalization=raw",
            stacklevel=2,
        )
    tiers = TRACK_TIERS[track]
    mice = {m: s for m, s in dm.stores.items() if s.trials(list(tiers)).size}
    hidden = {m for m, s in mice.items() if s.hidden[s.trials(list(tiers))].any()}
    if hidden and set(mice) - hidden:
        log.warning(
            "submitting mice %s whose test responses are known beside %s whose are hidden: the site scores only "
            "the competition mice; select them with --data.mice",
            sorted(set(mice) - hidden),
            sorted(hidden),
        )
    builder = SubmissionBuilder(out, mice, track=track, scale_by_precision=scale_by_precision)
    try:
        run_prediction(
            model,
            dm.trial_loader(list(tiers), skip_hidden=False),
            [_submission_writer(builder)],
            accelerator=accelerator,
            progress=progress,
        )
    except BaseException:
        builder.abort()
        raise
    return builder.finish()


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
