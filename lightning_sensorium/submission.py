"""`lightning-sensorium submit`: the competition's parquet files and zips, validated before anything is written.

Predictions are on the competition's scale (raw responses × the official per-frame precision) by default,
whatever the checkpoints were trained on: the whole-trial batches carry the factor that takes a raw- or
ViV1T-scale model there (:mod:`lightning_sensorium.data.normalization`), as DwiseNeuro scaled its submission
(``make_submission`` in https://github.com/lRomul/sensorium/blob/main/src/submission.py, with ``ResponseNormalizer``
of ``src/responses.py``: +0.023 in its commit 20fd7a5). The format (names, columns, schema) is
:mod:`lightning_sensorium.submission_format`'s. Main track:
``predictions_live_main.parquet.brotli`` + ``predictions_final_main.parquet.brotli`` in one zip, at its root; bonus
track: ``predictions_live_test_bonus_ood.parquet.brotli`` and ``predictions_final_test_bonus_ood.parquet.brotli``,
zipped separately (the site's upload size limit). pyarrow writes row group by row group, so memory stays bounded.
"""

from __future__ import annotations

import contextlib
import logging
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lightning_sensorium.atomic import place, remove, temporary_sibling
from lightning_sensorium.callbacks.prediction_writer import BatchSink
from lightning_sensorium.data.layout import SKIP_FRAMES
from lightning_sensorium.data.store import MouseStore
from lightning_sensorium.ensemble import load_ensemble
from lightning_sensorium.inference import run_predict_loop
from lightning_sensorium.submission_format import (
    FILE_NAMES,
    SubmissionError,
    check_prediction,
    record_batch,
    schema,
    scored_frames,
)

log = logging.getLogger(__name__)

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


class SubmissionBuilder:
    """Validates trial predictions as they come and writes the submission files atomically.

    Everything goes to a temporary folder beside ``out``; :meth:`finish` checks that every trial of every tier is
    there once, then moves the parquet files and zips into ``out``. Any error leaves ``out`` untouched.

    Args:
        out: output folder.
        stores: the mice to submit, by id.
        track: ``main`` or ``bonus``.
        flush_rows: trials buffered before a parquet row group is written.

    Predictions are written as given (:func:`submit` hands it predictions on the competition's scale).
    """

    def __init__(
        self,
        out: str | Path,
        stores: Mapping[str, MouseStore],
        track: Literal["main", "bonus"] = "main",
        flush_rows: int = 8,
    ) -> None:
        if track not in TRACK_TIERS:
            raise SubmissionError(f"track {track!r}: expected one of {sorted(TRACK_TIERS)}")
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
        self.tmp = temporary_sibling(self.out)
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
        self.writers[tier].write_table(record_batch(rows))
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
        final = [place(path, self.out / path.name) for path in written]
        remove(self.tmp)
        return final

    def abort(self) -> None:
        """Drop everything written so far."""
        for writer in self.writers.values():
            with contextlib.suppress(Exception):  # best effort while cleaning up after another error
                writer.close()
        self.writers.clear()
        remove(self.tmp)


def _submission_writer(builder: SubmissionBuilder, model_scale: bool = False) -> Any:
    """A Lightning prediction writer that hands every predicted trial to ``builder``; ``model_scale``: divide the
    predictions by the batch's ``response_scale`` (back to the model's own scale)."""

    def sink(prediction: Any, batch: Any) -> None:
        pred = prediction["prediction"].float().cpu()  # (B, N, T)
        if model_scale and batch.get("response_scale") is not None:
            pred = pred / batch["response_scale"].float().cpu()
        pred = pred.numpy()
        for b, (trial, length) in enumerate(zip(batch["trial"].tolist(), batch["length"].tolist(), strict=True)):
            builder.add(batch["mouse_id"], batch["tier"], trial, pred[b], length)

    return BatchSink(sink, on_error=builder.abort)


def writes_model_scale(normalization: str, scale_by_precision: bool | None) -> bool:
    """Whether ``submit`` writes the model's own scale (True) rather than the competition's (False).

    ``scale_by_precision``: None (default) — the competition's scale, which the checkpoints' ``data.normalization``
    decides: ``official`` models predict it already, ``raw`` and ``viv1t`` ones are scaled frame by frame; True —
    require that scaling (an error for an ``official`` model, which would be scaled twice); False — the model's own
    scale, unscaled (as DwiseNeuro before its commit 20fd7a5 and ViV1T's ``demo.ipynb`` submitted; for ``official``
    models the same as the default).
    """
    if scale_by_precision and normalization == "official":
        raise SubmissionError(
            "--scale-by-precision: the checkpoint(s) were trained with data.normalization='official', whose "
            "predictions are on the competition's scale already (scaling them again would square the precision); "
            "it applies to data.normalization raw or viv1t"
        )
    if scale_by_precision is False and normalization != "official":
        log.warning(
            "--no-scale-by-precision: writing the predictions of a data.normalization=%s model on its own scale; "
            "the competition scores raw responses × the per-frame precision (DwiseNeuro: −0.023 unscaled)",
            normalization,
        )
        return True
    return False


def submit(
    ckpt_paths: Sequence[str | Path],
    out: str | Path,
    *,
    data: dict[str, Any] | None = None,
    track: Literal["main", "bonus"] = "main",
    scale_by_precision: bool | None = None,
    accelerator: str = "auto",
    progress: bool = True,
) -> list[Path]:
    """Predict every test trial of ``track`` with the (ensemble of) checkpoint(s) and write the submission, on the
    competition's scale unless ``scale_by_precision`` is False (:func:`writes_model_scale`)."""
    if track not in TRACK_TIERS:
        raise SubmissionError(f"track {track!r}: expected one of {sorted(TRACK_TIERS)}")
    model, dm = load_ensemble(ckpt_paths, data)
    model_scale = writes_model_scale(dm.normalization, scale_by_precision)
    tiers = TRACK_TIERS[track]
    mice = {m: s for m, s in dm.stores.items() if s.trials(list(tiers)).size}
    hidden = {m for m, s in mice.items() if s.hidden[s.trials(list(tiers))].any()}
    if hidden and set(mice) - hidden:
        log.warning(
            "submitting mice %s whose test responses are known beside %s whose are hidden: the site scores only "
            "the competition mice; select them with data.mice",
            sorted(set(mice) - hidden),
            sorted(hidden),
        )
    builder = SubmissionBuilder(out, mice, track=track)
    try:
        run_predict_loop(
            model,
            dm.trial_loader(list(tiers), skip_hidden=False),
            [_submission_writer(builder, model_scale)],
            accelerator=accelerator,
            progress=progress,
        )
    except BaseException:
        builder.abort()
        raise
    return builder.finish()
