"""ZarrPredictionWriter: streams ``predict`` outputs into a zarr store, batch by batch, atomically.

One group per mouse, rows in store order; the store is written under a temporary name and renamed when complete, so
it is either complete or absent, and memory stays at one batch. ``BatchSink`` hands batches to a function instead
(``evaluate``, ``submit``). The store's layout and the YAML to use it from ``lightning predict``:
docs/evaluation.md, "Predict (`infer`)".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import zarr
from lightning.pytorch.callbacks import BasePredictionWriter

from lightning_sensorium.atomic import place, remove, temporary_sibling
from lightning_sensorium.data.layout import TIERS

#: ``format`` attribute of a prediction store.
FORMAT = "lightning_sensorium.predictions"


@dataclass
class PredictionLayout:
    """What one mouse's group holds: one output row per ``keys`` value (the batches' ``trial`` numbers).

    Attributes:
        mouse_id: the mouse.
        keys: ``(n,)`` the ``trial`` values batches carry, in output row order.
        frames: length of the frame axis (the longest trial).
        unit_ids: ``(N,)`` neuron ids.
        columns: per-row arrays written beside the predictions (``trial``, ``trial_index``, ``length``, ...).
        column_attrs: attributes of those arrays (e.g. ``flag_meanings`` of codes).
        attrs: attributes of the mouse group.
    """

    mouse_id: str
    keys: np.ndarray
    frames: int
    unit_ids: np.ndarray
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    column_attrs: dict[str, dict[str, Any]] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)


def tier_layouts(dm: Any, tiers: Sequence[str], max_trials: int | None = None) -> list[PredictionLayout]:
    """Layouts for whole trials of ``tiers`` of every mouse of a SensoriumDataModule (hidden trials included)."""
    layouts = []
    for mouse in dm.mouse_ids:
        store = dm.stores[mouse]
        rows = np.sort(
            np.concatenate([dm.selected_trials(mouse, t, skip_hidden=False, max_trials=max_trials) for t in tiers])
        ).astype(np.int64)
        if rows.size == 0:
            continue
        tier_code = np.array([TIERS.index(store.tier_labels[int(c)]) for c in store.tier_code[rows]], dtype=np.int8)
        stim = store.stimulus_code[rows].astype(np.int8)
        layouts.append(
            PredictionLayout(
                mouse_id=mouse,
                keys=rows,
                frames=int(store.length[rows].max()),
                unit_ids=np.asarray(store.unit_ids),
                columns={
                    "trial": rows,
                    "trial_index": np.asarray(store.trial_index[rows], dtype=np.int64),
                    "tier": tier_code,
                    "length": store.length[rows].astype(np.int32),
                    "hidden": store.hidden[rows].astype(bool),
                    "stimulus_type": stim,
                },
                column_attrs={
                    "tier": {"flag_meanings": " ".join(TIERS)},
                    "stimulus_type": {"flag_meanings": " ".join(store.stimulus_labels)},
                },
                attrs={"tiers": list(tiers)},
            )
        )
    return layouts


class ZarrPredictionWriter(BasePredictionWriter):
    """Writes every predicted batch into a zarr store (layout: docs/evaluation.md, "Predict (`infer`)").

    Args:
        out: the output store path (``.zarr``).
        overwrite: replace an existing ``out`` (otherwise an existing one is an error, raised before predicting).
        tiers: tiers to lay out when the layout comes from the datamodule (default: its ``infer_tiers``).
        layouts: explicit per-mouse layouts (user stimuli); default: built from the trainer's datamodule.
        attrs: extra root attributes (e.g. the checkpoints).
    """

    def __init__(
        self,
        out: str,
        overwrite: bool = False,
        tiers: list[str] | None = None,
        layouts: Sequence[PredictionLayout] | None = None,
        attrs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(write_interval="batch")
        self.out = Path(out)
        self.overwrite = overwrite
        self.tiers = tiers
        self.layouts: list[PredictionLayout] | None = list(layouts) if layouts is not None else None
        self.attrs = dict(attrs or {})
        self._tmp: Path | None = None
        self._rows: dict[str, dict[int, int]] = {}
        self._written: dict[str, np.ndarray] = {}
        self._arrays: dict[str, Any] = {}
        self.written: Path | None = None

    # -------------------------------------------------------------------------------------------- lifecycle
    def check_target(self) -> None:
        """Raise if ``out`` exists and may not be replaced."""
        if self.out.exists() and not self.overwrite:
            raise FileExistsError(f"{self.out} exists; set overwrite=True to replace it")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1:
            raise RuntimeError("ZarrPredictionWriter writes one store from one process: predict with devices=1")
        self.check_target()
        if self.layouts is None:
            dm = getattr(trainer, "datamodule", None)
            if dm is None or not hasattr(dm, "selected_trials"):
                raise RuntimeError("ZarrPredictionWriter needs a SensoriumDataModule (or explicit layouts)")
            self.layouts = tier_layouts(dm, self.tiers or dm.infer_tiers)
        self._open(self.layouts)

    def _open(self, layouts: Sequence[PredictionLayout]) -> None:
        self._tmp = temporary_sibling(self.out)
        root = zarr.open_group(str(self._tmp), mode="w")
        root.attrs.update({"format": FORMAT, "format_version": 1, "mice": [lay.mouse_id for lay in layouts]})
        root.attrs.update(self.attrs)
        for lay in layouts:
            group = root.create_group(lay.mouse_id)
            group.attrs.update(lay.attrs)
            n, neurons = len(lay.keys), len(lay.unit_ids)
            self._arrays[lay.mouse_id] = group.create_array(
                "prediction",
                shape=(n, lay.frames, neurons),
                chunks=(1, lay.frames, neurons),  # one trial per chunk: one write per predicted trial
                dtype="float32",
                fill_value=np.nan,
                dimension_names=("trial", "frame", "neuron"),
            )
            group.create_array("unit_ids", data=np.asarray(lay.unit_ids), dimension_names=("neuron",))
            for name, values in lay.columns.items():
                arr = group.create_array(name, data=np.asarray(values), dimension_names=("trial",))
                arr.attrs.update(lay.column_attrs.get(name, {}))
            self._rows[lay.mouse_id] = {int(k): i for i, k in enumerate(lay.keys)}
            self._written[lay.mouse_id] = np.zeros(n, dtype=bool)

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if prediction is None:  # a DDP rank's padding batch (SensoriumModule.predict_step)
            return
        self.write(prediction["mouse_id"], prediction["trial"], prediction["length"], prediction["prediction"])

    def write(self, mouse: str, trials: Any, lengths: Any, pred: Any) -> None:
        """Store ``pred (B, N, T)`` of trials ``trials (B,)`` with valid ``lengths (B,)`` of one mouse."""
        if mouse not in self._arrays:
            raise KeyError(f"ZarrPredictionWriter: mouse {mouse} is not in the output layout")
        values = pred.float().cpu().numpy() if hasattr(pred, "cpu") else np.asarray(pred, np.float32)
        arr, rows = self._arrays[mouse], self._rows[mouse]
        trials, lengths = _as_list(trials), _as_list(lengths)
        for b, (trial, length) in enumerate(zip(trials, lengths, strict=True)):
            if int(trial) not in rows:
                raise KeyError(f"ZarrPredictionWriter: mouse {mouse}, trial {trial} is not in the output layout")
            row = rows[int(trial)]
            block = np.full((arr.shape[1], arr.shape[2]), np.nan, dtype=np.float32)  # (frame, neuron)
            block[:length] = values[b, :, :length].T  # (N, T) -> (T, N)
            arr[row] = block
            self._written[mouse][row] = True

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.finish()

    def finish(self) -> Path:
        """Check every row was written, then move the temporary store to ``out``."""
        if self._tmp is None:
            raise RuntimeError("ZarrPredictionWriter: nothing was opened")
        for mouse, done in self._written.items():
            if not done.all():
                self.abort()
                raise RuntimeError(
                    f"ZarrPredictionWriter: mouse {mouse}: {int((~done).sum())} trial(s) never predicted"
                )
        self.check_target()
        place(self._tmp, self.out)
        self._tmp = None
        self.written = self.out
        return self.out

    def abort(self) -> None:
        """Remove the temporary store."""
        if self._tmp is not None:
            remove(self._tmp)
            self._tmp = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.abort()


def _as_list(x: Any) -> list[int]:
    return [int(v) for v in (x.cpu().tolist() if hasattr(x, "cpu") else np.asarray(x).tolist())]


def read_predictions(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """Load a prediction store into memory: ``{mouse: {array name: values}}`` (small stores, tests, notebooks)."""
    root = zarr.open_group(str(path), mode="r")
    if root.attrs.get("format") != FORMAT:
        raise ValueError(f"{path}: not a lightning_sensorium prediction store")
    names: list[str] = [str(m) for m in root.attrs["mice"]]  # type: ignore[union-attr]
    mice: Mapping[str, Any] = {m: root[m] for m in names}
    return {m: {name: np.asarray(arr[...]) for name, arr in g.arrays()} for m, g in mice.items()}


class BatchSink(BasePredictionWriter):
    """Hands every predicted batch to ``sink(prediction, batch)`` as it arrives (bounded memory); ``on_error`` runs
    if prediction fails. The one writer behind ``evaluate`` (scoring) and ``submit`` (parquet files)."""

    def __init__(
        self,
        sink: Callable[[Mapping[str, Any], Mapping[str, Any]], None],
        on_error: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(write_interval="batch")
        self.sink, self.on_error = sink, on_error

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if prediction is not None:  # None: a DDP rank's padding batch (SensoriumModule.predict_step)
            self.sink(prediction, batch)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self.on_error is not None:
            self.on_error()
