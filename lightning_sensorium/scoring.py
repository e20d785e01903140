"""The official metrics of any predictions, per tier, mouse and stimulus type; local scoring of a submission.

:class:`TierScores` is the one place where predictions meet targets outside training: ``evaluate`` feeds it model
predictions batch by batch, ``score`` feeds it the rows of a submission file, so the same predictions give the
same numbers, both on the competition's scale (raw responses × the official per-frame precision). Per (tier,
mouse) — and, for bonus tiers or tiers mixing stimulus families, per (tier, stimulus type, mouse) — it keeps a
:class:`~lightning_sensorium.metrics.MetricGroup`: single-trial correlation (the competition score), correlation to
the repeat average, the leave-one-out oracle, FEVE, and on synthetic mice the ground-truth oracle (noiseless rates
vs recorded responses). Pooled values are the official neuron-weighted mean.

:func:`score_submission` reads the parquet files that ``submit`` writes (or a zip of them, or the official
``generate_submission`` names) and scores them against stores whose test responses are known (synthetic mice, the
old mice of the later release), on the scale the competition scores: raw responses × per-frame precision.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_sensorium.data.datamodule import SensoriumDataModule, discover_stores
from lightning_sensorium.data.layout import SKIP_FRAMES, TIERS
from lightning_sensorium.data.store import MouseStore
from lightning_sensorium.metrics import MetricGroup, summarise
from lightning_sensorium.submission_format import (
    PARQUET_SUFFIX,
    SubmissionError,
    read_submission_file,
    tier_of_file,
)

#: Tiers whose trials mix (or are) out-of-distribution stimulus families: always broken down by type.
BONUS_TIERS = ("live_test_bonus", "final_test_bonus")


@dataclass
class _Group:
    """The metrics of one (tier, stimulus type or None, mouse)."""

    mouse: str
    clips: np.ndarray  # sorted distinct clip ids: the dense clip index is the position here
    metrics: MetricGroup
    trials: int = 0
    seen: set[int] = field(default_factory=set)


class TierScores:
    """Accumulates the official metrics of whole-trial predictions, per tier, mouse and stimulus type.

    Args:
        stores: the mice, by id.
        trials: ``{tier: {mouse: store trial rows}}`` that will be scored (each exactly once).
        skip_frames: leading frames of every trial that are not scored (official: 50).
        by_stimulus_type: also keep metrics per stimulus type in bonus tiers and in tiers that mix types.
    """

    def __init__(
        self,
        stores: Mapping[str, MouseStore],
        trials: Mapping[str, Mapping[str, np.ndarray]],
        skip_frames: int = SKIP_FRAMES,
        by_stimulus_type: bool = True,
    ) -> None:
        self.stores = dict(stores)
        self.skip_frames = skip_frames
        self.groups: dict[tuple[str, str | None, str], _Group] = {}
        for tier, per_mouse in trials.items():
            types = {self._type(m, int(t)) for m, rows in per_mouse.items() for t in rows}
            split = by_stimulus_type and (tier in BONUS_TIERS or len(types) > 1)
            for mouse, rows in per_mouse.items():
                rows = np.asarray(rows, dtype=np.int64)
                if rows.size == 0:
                    continue
                self._add_group(tier, None, mouse, rows)
                if split:
                    names = np.array([self._type(mouse, int(t)) for t in rows])
                    for name in sorted(set(names)):
                        self._add_group(tier, str(name), mouse, rows[names == name])

    def _type(self, mouse: str, trial: int) -> str:
        store = self.stores[mouse]
        return store.stimulus_labels[int(store.stimulus_code[trial])]

    def _add_group(self, tier: str, stim: str | None, mouse: str, rows: np.ndarray) -> None:
        store = self.stores[mouse]
        clips = np.unique(store.clip_id[rows])
        n, skip = store.num_neurons, self.skip_frames
        self.groups[tier, stim, mouse] = _Group(
            mouse=mouse,
            clips=clips,
            metrics=MetricGroup(n, num_clips=len(clips), skip_frames=skip),
            trials=len(rows),
        )

    def update(
        self,
        mouse: str,
        tier: str,
        trials: Tensor | np.ndarray | Sequence[int],
        pred: Tensor,
        target: Tensor,
        lengths: Tensor,
        rates: Tensor | None = None,
    ) -> None:
        """Add a batch of whole trials of one mouse and tier: ``pred``, ``target``, ``rates`` ``(B, N, T)``.

        Scored frames (``skip_frames ≤ t < length``) must be finite in ``pred``; other frames may be NaN.
        """
        key = (tier, None, mouse)
        if key not in self.groups:
            raise KeyError(f"mouse {mouse}, tier {tier}: not among the trials this scorer was set up for")
        rows = np.asarray(torch.as_tensor(trials).cpu(), dtype=np.int64)
        pred, target = pred.detach().float().cpu(), target.detach().float().cpu()
        lengths = torch.as_tensor(lengths).cpu()
        t = torch.arange(pred.shape[-1])[None]  # (1, T)
        scored = (t >= self.skip_frames) & (t < lengths[:, None])  # (B, T)
        bad = ~torch.isfinite(pred) & scored[:, None]  # (B, N, T)
        if bool(bad.any()):
            b, _, f = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"mouse {mouse}, tier {tier}, trial {rows[b]}: no finite prediction at scored frame {f} "
                f"(the model loses more leading frames than the {self.skip_frames} unscored ones?)"
            )
        pred = torch.nan_to_num(pred, nan=0.0)
        rates = None if rates is None else rates.detach().float().cpu()
        self._update_group(self.groups[key], rows, pred, target, lengths, rates)
        typed = [k for k in self.groups if k[0] == tier and k[2] == mouse and k[1] is not None]
        if typed:
            names = np.array([self._type(mouse, int(r)) for r in rows])
            for k in typed:
                sel = np.flatnonzero(names == k[1])
                if sel.size:
                    idx = torch.from_numpy(sel)
                    sub_rates = None if rates is None else rates[idx]
                    self._update_group(self.groups[k], rows[sel], pred[idx], target[idx], lengths[idx], sub_rates)

    def _update_group(
        self, group: _Group, rows: np.ndarray, pred: Tensor, target: Tensor, lengths: Tensor, rates: Tensor | None
    ) -> None:
        repeated = group.seen.intersection(rows.tolist())
        if repeated:
            raise ValueError(f"trial(s) {sorted(repeated)} scored twice")
        group.seen.update(rows.tolist())
        clip_index = torch.from_numpy(np.searchsorted(group.clips, self.stores[group.mouse].clip_id[rows]))
        group.metrics.update(pred, target, clip_index, lengths, rates)

    def missing(self) -> dict[tuple[str, str], int]:
        """``{(tier, mouse): trials not yet scored}`` for groups that are incomplete."""
        return {
            (tier, mouse): g.trials - len(g.seen)
            for (tier, stim, mouse), g in self.groups.items()
            if stim is None and len(g.seen) < g.trials
        }

    def compute(self) -> dict[str, Any]:
        """Results per tier: ``pooled``, ``per_mouse``, ``trials`` and, where split, ``per_stimulus_type``.

        Also fills :attr:`vectors` — ``{tier: {mouse: {metric: (N,) array}}}`` — for figures.
        """
        missing = self.missing()
        if missing:
            (tier, mouse), n = next(iter(missing.items()))
            raise ValueError(f"mouse {mouse}, tier {tier}: {n} trial(s) were never scored")
        values: dict[tuple[str, str | None], dict[str, dict[str, Tensor]]] = {}
        for (tier, stim, mouse), g in self.groups.items():
            values.setdefault((tier, stim), {})[mouse] = g.metrics.compute()
        self.vectors: dict[str, dict[str, dict[str, np.ndarray]]] = {}
        out: dict[str, Any] = {}
        for (tier, stim), per_mouse in values.items():
            res = summarise({tier: per_mouse})[tier]
            entry = {"pooled": res["pooled"], "per_mouse": res["per_mouse"]}
            for vals in entry["per_mouse"].values():
                gt = vals.get("ground_truth_corr")
                if gt is not None and gt > 0:
                    vals["fraction_of_ground_truth"] = vals["single_trial_corr"] / gt
            entry["trials"] = {m: self.groups[tier, stim, m].trials for m in per_mouse}
            if stim is None:
                out.setdefault(tier, {}).update(entry)
                self.vectors[tier] = {
                    m: {k: t.cpu().numpy() for k, t in v.items() if t.dim() == 1} for m, v in per_mouse.items()
                }
            else:
                out.setdefault(tier, {}).setdefault("per_stimulus_type", {})[stim] = entry
        order = list(dict.fromkeys(t for t, _, _ in self.groups))
        return {t: out[t] for t in order if t in out}


def nan_to_none(x: Any) -> Any:
    """JSON-safe copy: non-finite floats become None."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [nan_to_none(v) for v in x]
    return x


# ------------------------------------------------------------------------------------------ scoring submissions
def _scoring_datamodule(root: str, mice: Sequence[str], storage_options: dict[str, Any] | None) -> Any:
    """Whole trials on the scale the competition scores (raw responses × per-frame precision)."""
    # Any tier may serve as "train": scoring never samples windows, and a test-only store must still open.
    return SensoriumDataModule(
        root=root,
        mice=list(mice),
        train_tiers=list(TIERS),
        frames=1,
        normalization="official",
        storage_options=storage_options,
    )


@contextmanager
def _open_sources(path: Path) -> Iterator[list[tuple[str, Any]]]:
    """``[(file name, binary file or path)]`` of the parquet files in a file, a zip or a folder."""
    if path.is_dir():
        files = sorted(path.glob(f"*{PARQUET_SUFFIX}"))
        if not files:
            raise FileNotFoundError(f"{path}: no *{PARQUET_SUFFIX} file in this folder")
        yield [(f.name, f) for f in files]
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith(PARQUET_SUFFIX) and not n.startswith("__MACOSX")]
            if not names:
                raise FileNotFoundError(f"{path}: the zip holds no *{PARQUET_SUFFIX} file (it has {zf.namelist()[:5]})")
            nested = [n for n in names if "/" in n]
            if nested:
                raise ValueError(f"{path}: {nested[0]} is inside a folder; the site expects files at the zip's root")
            handles = [(n, zf.open(n)) for n in names]
            try:
                yield handles
            finally:
                for _, h in handles:
                    h.close()
    elif path.is_file():
        yield [(path.name, path)]
    else:
        raise FileNotFoundError(f"{path}: no such submission file, zip or folder")


def score_submission(
    path: str | Path,
    root: str,
    mice: Sequence[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    by_stimulus_type: bool = True,
) -> dict[str, Any]:
    """Score a submission (parquet file, zip of them, or the folder ``submit`` wrote) against the stores in ``root``.

    Every mouse named in a file must have a store under ``root`` with known responses for that file's tier; every
    trial of that tier must be present once, with ``neuron_ids`` equal to the store's ``unit_ids`` and one frame
    per scored frame (``length - 50``). Anything else raises a ValueError naming the file, mouse and trial.
    """
    path = Path(path)
    results: dict[str, Any] = {"submission": str(path), "data_root": str(root), "tiers": {}}
    with _open_sources(path) as sources:
        for name, source in sources:
            tier = tier_of_file(name)
            if tier in results["tiers"]:
                raise SubmissionError(f"{path}: two files for tier {tier}")
            available = {Path(p).name[: -len(".zarr")] for p in discover_stores(root, mice, storage_options)}
            table = read_submission_file(source, name)
            unknown = sorted(set(table.mice) - available)
            if unknown:
                raise SubmissionError(
                    f"{name}: unknown mouse {unknown[0]!r}: no store under {root} (available: {sorted(available)})"
                )
            dm = _scoring_datamodule(root, sorted(table.mice), storage_options)
            trials = {tier: {}}  # type: dict[str, dict[str, np.ndarray]]
            for mouse in dm.mouse_ids:
                store = dm.stores[mouse]
                rows = store.trials(tier)
                hidden = rows[store.hidden[rows]]
                if hidden.size:
                    raise SubmissionError(
                        f"{name}: mouse {mouse}: the responses of {hidden.size} {tier} trial(s) are hidden (all zero) "
                        "in this store, so they cannot be scored; use stores with released responses"
                    )
                table.check_mouse(mouse, store, rows)
                trials[tier][mouse] = rows
            scorer = TierScores(dm.stores, trials, by_stimulus_type=by_stimulus_type)
            for mouse in dm.mouse_ids:
                store = dm.stores[mouse]
                preds = table.predictions(mouse, store)  # {trial_index: (N, F) float32}
                row_of = {int(store.trial_index[r]): int(r) for r in trials[tier][mouse]}
                by_row = {row_of[i]: p for i, p in preds.items()}
                for batch in _scoring_datamodule(root, [mouse], storage_options).trial_loader([tier]):
                    target = batch["responses"]  # (B, N, T)
                    pred = torch.zeros_like(target)
                    for b, (row, length) in enumerate(
                        zip(batch["trial"].tolist(), batch["length"].tolist(), strict=True)
                    ):
                        cols = by_row[row]  # (N, length - skip)
                        pred[b, :, SKIP_FRAMES:length] = torch.from_numpy(cols)
                    scorer.update(mouse, tier, batch["trial"], pred, target, batch["length"], batch.get("rates"))
            results["tiers"].update(scorer.compute())
    return results
