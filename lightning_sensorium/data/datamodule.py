"""SensoriumDataModule: streams per-mouse zarr stores into training windows and whole-trial evaluation batches.

Training draws windows of ``frames`` frames (every ``frame_step``-th frame) from the trials of the train tiers:
each window from a random trial (``window_sampling="with_replacement"``), or each trial once per epoch in a fresh
random order (``"each_trial_once"``: the starter kit's ``SubsetRandomSampler``, ViV1T's ``shuffle=True``). Evaluation
reads whole trials (up to their valid length) so the official metrics see every scored frame; validation can read
the starter kit's one random 80-frame window per trial instead (``val_windows="official"``). Batches hold one mouse
(``batch_mode="per_mouse"``: the official LongCycler / ViV1T scheme, mice cycled batch by batch) or several
(``batch_mode="mixed"``: DwiseNeuro; then ``mouse_id`` is a list and responses are given per sample in
``responses`` as a list). ``num_folds`` / ``fold`` split the train and oracle trials into folds of whole clips
(DwiseNeuro's group k-fold) and validate on one. The options and the originals they follow: docs/training.md,
"The data module".
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final, Literal, get_args

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_sensorium.data.batch import NeuronInfo
from lightning_sensorium.data.layout import TIERS
from lightning_sensorium.data.normalization import InputStatistics, Normalization, Normalizer
from lightning_sensorium.data.store import MouseStore, is_url

log = logging.getLogger(__name__)

#: Where `make demo` puts the synthetic stores; the default data root.
DEFAULT_ROOT = "data/stores"

#: The name validation batches carry as their ``tier`` when ``data.num_folds`` is set (the held-out fold).
VALIDATION_FOLD: Final = "fold"
#: Frames of the starter kit's validation window (``frames=80`` of ``mouse_video_loader`` in
#: https://github.com/ecker-lab/sensorium_2023/blob/main/notebooks/benchmarks_training.ipynb); the metrics skip
#: the first 50 of them (``skip=50`` in https://github.com/ecker-lab/sensorium_2023/blob/main/sensorium/utility/scores.py).
OFFICIAL_VAL_FRAMES: Final = 80

WindowSampling = Literal["with_replacement", "mouse_quotas", "each_trial_once"]
ValWindows = Literal["whole_trials", "official"]
DatasetSize = Literal["all_trials", "train_trials"]
MouseSelection = Literal["all", "competition"]
Batch = dict[str, Any]
Plan = list[tuple[str, int, int]]  # one batch: (mouse_id, trial, first frame) per window


def _mouse_key(mouse: str) -> int:
    """A stable number for a mouse id (seeds draws that must not depend on which other mice are selected)."""
    return zlib.crc32(mouse.encode())


def clip_subset(trials: np.ndarray, clip_ids: np.ndarray, fraction: float, seed: int, mouse: str = "") -> np.ndarray:
    """The trials of a seeded ``fraction`` of the distinct clips (at least one), in their order: the same seed's
    clip order for every fraction, so a smaller share is a subset of a larger one."""
    clips = np.unique(clip_ids)
    order = np.random.default_rng([seed, _mouse_key(mouse), 1]).permutation(len(clips))
    keep = clips[order[: max(1, round(fraction * len(clips)))]]
    return trials[np.isin(clip_ids, keep)]


def assign_folds(clip_ids: np.ndarray, num_folds: int, seed: int, mouse: str = "") -> np.ndarray:
    """The fold (``0 … num_folds - 1``) of each trial, whole clips per fold, folds balanced in trials.

    DwiseNeuro's group k-fold keeps every repeat of a clip in one fold (its perceptual hash modulo the number of
    folds: ``get_folds_tiers`` in https://github.com/lRomul/sensorium/blob/main/src/data.py); here the clip ids of the
    store group the trials, and the folds are balanced: clips with more trials first (ties in a random order seeded
    by ``seed`` and ``mouse``), each into the fold with the fewest trials so far (the lowest fold on ties).
    """
    clips, inverse, counts = np.unique(clip_ids, return_inverse=True, return_counts=True)
    if num_folds > len(clips):
        where = f"mouse {mouse}: " if mouse else ""
        raise ValueError(
            f"data.num_folds={num_folds}: {where}only {len(clips)} distinct clips to split into folds "
            f"(expected at most {len(clips)} folds)"
        )
    order = np.random.default_rng([seed, _mouse_key(mouse)]).permutation(len(clips))
    order = order[np.argsort(-counts[order], kind="stable")]  # most trials first, random among equals
    sizes = np.zeros(num_folds, dtype=np.int64)
    fold_of_clip = np.empty(len(clips), dtype=np.int64)
    for clip in order:
        fold = int(np.argmin(sizes))
        fold_of_clip[clip] = fold
        sizes[fold] += counts[clip]
    return fold_of_clip[inverse]


def _competition_mice(stores: list[MouseStore]) -> list[MouseStore]:
    """The stores whose live and final main test responses are hidden (the competition's mice), or all of them where
    none is (logged)."""
    tiers = ("live_test_main", "final_test_main")
    hidden = [s for s in stores if len(s.trials(tiers)) and s.hidden[s.trials(tiers)].all()]
    if not hidden:
        log.info("data.mouse_selection=competition: no store hides its test responses; using all %d mice", len(stores))
        return stores
    return hidden


def discover_stores(root: str, mice: Sequence[str] | None, storage_options: dict[str, Any] | None) -> list[str]:
    """The store paths (or URLs) of the selected mice under ``root``, sorted by mouse id."""
    if is_url(root):
        if not mice:
            raise ValueError(f"data.root={root!r} is a URL: list the mice explicitly with data.mice")
        return [f"{root.rstrip('/')}/{m}.zarr" for m in mice]
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(
            f"data.root={root!r}: no such folder. Create synthetic mice with `make demo` or "
            "`lightning-sensorium synth DIR && lightning-sensorium convert DIR/* --out data/stores`."
        )
    found = {p.name[: -len(".zarr")]: str(p) for p in sorted(base.glob("*.zarr")) if p.is_dir()}
    if not found:
        raise FileNotFoundError(f"data.root={root!r} holds no <mouse_id>.zarr store")
    if not mice:
        return list(found.values())
    missing = [m for m in mice if m not in found]
    if missing:
        raise FileNotFoundError(f"data.mice: no store for {missing} under {root!r}; available: {sorted(found)}")
    return [found[m] for m in mice]


class _WindowPlans(DistributedSampler):
    """Draws the training batches of one epoch as plans ``[(mouse_id, trial, start), ...]``.

    A ``DistributedSampler`` so Lightning neither replaces it under DDP nor forgets to call ``set_epoch``; all ranks
    yield the same number of batches so DDP never waits on a rank that ran dry. Mice are cycled by global batch
    number (the official LongCycler order) in ``per_mouse`` mode. ``with_replacement``: every rank draws its own
    stream from ``(seed, epoch, rank)``, mice uniformly per sample in ``mixed`` mode. ``mouse_quotas`` and
    ``each_trial_once``: every rank builds the epoch's global plan from ``(seed, epoch)``
    (:meth:`SensoriumDataModule.epoch_plan`) and takes its share, global batches ``rank, rank + world, ...``
    (wrapping around to the first ones where the ranks' shares differ, as ``DistributedSampler`` pads).
    """

    def __init__(self, dm: SensoriumDataModule, epoch_batches: int, rank: int = 0, world_size: int = 1) -> None:
        batches: Any = range(epoch_batches)  # only its length matters to DistributedSampler
        super().__init__(batches, num_replicas=world_size, rank=rank, shuffle=False, seed=dm.seed)
        self.dm = dm
        self.local_batches = math.ceil(epoch_batches / world_size)
        self.skip = (-1, 0)  # (epoch, batches) to leave out when that epoch is iterated (resuming mid-epoch)

    def __len__(self) -> int:
        return self.local_batches

    def __iter__(self) -> Iterator[Plan]:  # type: ignore[override,unused-ignore]
        epoch, batches = self.skip
        skip = batches if epoch == self.epoch else 0  # a save at an epoch's last batch resumes at the next epoch
        self.skip = (-1, 0)
        for k, plan in enumerate(self._plans()):
            if k >= skip:  # the skipped plans are drawn all the same: the stream stays the interrupted run's
                yield plan

    def _plans(self) -> Iterator[Plan]:
        if self.dm.window_sampling != "with_replacement":
            plan = self.dm.epoch_plan(self.epoch)
            for k in range(self.local_batches):
                yield plan[(k * self.num_replicas + self.rank) % len(plan)]
            return
        rng = np.random.default_rng([self.dm.seed, self.epoch, self.rank])
        mice = self.dm.mouse_ids
        for k in range(self.local_batches):
            if self.dm.batch_mode == "per_mouse":
                chosen = [mice[(k * self.num_replicas + self.rank) % len(mice)]] * self.dm.batch_size
            else:
                chosen = [mice[i] for i in rng.integers(0, len(mice), size=self.dm.batch_size)]
            yield [(m, *self.dm._draw_window(m, rng)) for m in chosen]


class _ResumableLoader(DataLoader):
    """The training loader, resumable mid-epoch (Lightning's ``state_dict``/``load_state_dict`` loader protocol):
    its state is the number of batches the trainer has processed in the current epoch, and a loaded state makes the
    next epoch's iteration leave those out. The epoch's plans are the same on resumption (they come from the seed, the
    epoch and the rank), so the run goes on with the batches it would have seen."""

    def __init__(self, dm: SensoriumDataModule, dataset: Dataset, sampler: _WindowPlans, num_workers: int) -> None:
        # Its own generator: making an iterator draws a base seed from it, not from the global RNG, whose stream a
        # resumed run must share with the interrupted one (restored by lightning_sensorium.callbacks.ModelCheckpoint).
        generator = torch.Generator().manual_seed(dm.seed)
        super().__init__(dataset, batch_size=None, sampler=sampler, num_workers=num_workers, generator=generator)
        self.dm, self.plans = dm, sampler

    def state_dict(self) -> dict[str, int]:
        trainer = self.dm.trainer
        if trainer is None:
            return {"epoch": 0, "batches": 0}
        progress: Any = trainer.fit_loop.epoch_loop.batch_progress.current  # a _ProcessedTracker during fit
        return {"epoch": int(trainer.current_epoch), "batches": int(progress.processed)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.plans.skip = (int(state.get("epoch", -1)), int(state.get("batches", 0)))


class _WindowReader(Dataset):
    """Reads and collates the windows of one batch plan (runs in DataLoader workers)."""

    def __init__(self, dm: SensoriumDataModule, epoch_batches: int) -> None:
        self.dm = dm
        self.epoch_batches = epoch_batches

    def __len__(self) -> int:
        return self.epoch_batches

    def __getitem__(self, plan: Plan) -> Batch:  # type: ignore[override,unused-ignore]
        return self.dm._collate(
            [self.dm._read(m, t, s, s + self.dm.span, rates=False, scored=False) for m, t, s in plan]
        )


class EvalTrials(Dataset):
    """Whole trials of the evaluation tiers, pre-grouped into batches of one mouse and one tier.

    ``window``: read one random window of this many frames of each trial instead (the starter kit's validation,
    ``data.val_windows="official"``); its first frame is :meth:`SensoriumDataModule.official_window_start`, drawn
    anew each epoch, so the dataset then takes ``(index, epoch)`` from :class:`PaddedEvalSampler` (``with_epoch``).
    A tier may be :data:`VALIDATION_FOLD`, the held-out fold of ``data.num_folds``.
    """

    def __init__(
        self,
        dm: SensoriumDataModule,
        tiers: Sequence[str],
        batch_size: int,
        skip_hidden: bool,
        max_trials: int | None = None,
        window: int | None = None,
    ) -> None:
        self.dm = dm
        self.window = window
        self.groups: list[tuple[str, str, list[int]]] = []
        # Dense clip index per (tier, mouse): the repeat metrics keep one slot per clip.
        self.clips: dict[tuple[str, str], np.ndarray] = {}
        for mouse in dm.mouse_ids:
            store = dm.stores[mouse]
            for tier in tiers:
                trials = dm.selected_trials(mouse, tier, skip_hidden, max_trials)
                self.clips[tier, mouse] = dm.tier_clips(mouse, tier, skip_hidden)
                short = trials[store.length[trials] < (window or 0)]
                if len(short):
                    raise ValueError(
                        f"data.val_windows='official' reads {window}-frame windows; mouse {mouse}, tier {tier}: "
                        f"trials {short.tolist()} are shorter (use data.val_windows: whole_trials)"
                    )
                # Sort by length so a batch pads little.
                trials = trials[np.argsort(store.length[trials], kind="stable")]
                for i in range(0, len(trials), batch_size):
                    self.groups.append((mouse, tier, [int(t) for t in trials[i : i + batch_size]]))

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int | tuple[int, int]) -> Batch:
        index, epoch = index if isinstance(index, tuple) else (index, 0)
        padding = index < 0  # see PaddedEvalSampler: a rank's stand-in batch, never scored or written
        mouse, tier, trials = self.groups[~index if padding else index]
        store = self.dm.stores[mouse]
        if self.window is None:
            samples = [self.dm._read(mouse, t, 0, int(store.length[t])) for t in trials]
        else:
            starts = [self.dm.official_window_start(mouse, t, epoch) for t in trials]
            samples = [self.dm._read(mouse, t, s, s + self.window, step=1) for t, s in zip(trials, starts, strict=True)]
        batch = self.dm._collate(samples)
        batch["tier"] = tier
        batch["clip_index"] = torch.from_numpy(np.searchsorted(self.clips[tier, mouse], batch["clip_id"].numpy()))
        if self.window is not None:
            batch["window_start"] = torch.tensor(starts)
        if padding:
            batch["padding"] = True
        return batch


class PaddedEvalSampler(DistributedSampler):
    """Each evaluation batch on exactly one rank (rank ``r`` takes batches ``r, r + world, ...``), and at least one
    batch on every rank.

    Lightning's ``UnrepeatedDistributedSampler`` also scores each batch once but refuses fewer batches than ranks
    (and a rank without a batch would skip the evaluation loop while the others wait in the metrics' all-reduce).
    Such a rank gets one *padding* batch instead: index ``~i`` (negative), which :class:`EvalTrials` reads as batch
    ``i`` marked ``padding``, and the module and the writers skip. A ``DistributedSampler``, so Lightning keeps it
    (and calls its ``set_epoch`` before each validation of a fit). ``with_epoch``: yield ``(index, epoch)``, for
    datasets that draw per epoch.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, with_epoch: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        n = len(dataset)  # type: ignore[arg-type]
        self.indices = list(range(rank, n, num_replicas)) or ([~(rank % n)] if n else [])
        self.with_epoch = with_epoch

    def __iter__(self) -> Iterator[int | tuple[int, int]]:  # type: ignore[override,unused-ignore]
        return iter([(i, self.epoch) for i in self.indices] if self.with_epoch else self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SensoriumDataModule(L.LightningDataModule):
    """Per-mouse zarr stores → training windows and whole-trial evaluation batches.

    Args:
        root: folder (or fsspec URL) holding ``<mouse_id>.zarr`` stores.
        mice: mouse ids to use (default: every store under ``root``; required for URLs).
        mouse_selection: ``all`` the mice found (or listed), or ``competition``: only those whose live and final
            test responses are hidden, the five new mice the competition scored and the starter kit's baselines train
            on (https://github.com/ecker-lab/sensorium_2023/blob/main/notebooks/benchmarks_training.ipynb); where no
            store hides its test responses (synthetic mice, your own recordings) every mouse is kept, and the log
            says so.
        train_tiers: tiers whose trials are sampled for training (hidden trials never are: listing a test tier
            trains on the mice whose test responses are labelled, as DwiseNeuro and ViV1T's ``ds_mode=3`` do).
        val_tiers: tiers evaluated during validation (the official validation tier is ``oracle``); with
            ``num_folds``, validation is the held-out fold (leave ``val_tiers`` unset).
        test_tiers: tiers evaluated by ``test`` / ``evaluate`` (hidden tiers are skipped).
        infer_tiers: tiers predicted by ``predict``.
        num_folds: split the labelled trials of ``train_tiers`` and ``oracle`` of each mouse into this many folds
            of whole clips (every repeat of a clip in one fold; :func:`assign_folds`), train on all folds but
            ``fold`` and validate on ``fold`` (whole trials; batches carry ``tier`` :data:`VALIDATION_FOLD`):
            DwiseNeuro's group 7-fold (https://github.com/lRomul/sensorium/blob/main/src/data.py,
            ``scripts/train.py``). ``None``: no folds. The assignment depends on ``seed``: keep it for all folds.
        fold: the held-out fold, ``0 … num_folds - 1``.
        val_windows: ``whole_trials``, or ``official``: validate on one random 80-frame window per trial, drawn
            anew each epoch, whose frames 50–79 the metrics score (the module's ``skip_frames``), as the starter
            kit's early stopping does (``Subsequence(frames=80, offset=-1)`` on the oracle loader of
            https://github.com/ecker-lab/sensorium_2023/blob/main/sensorium/datasets/mouse_video_loaders.py, scored by
            ``get_correlations`` of ``sensorium/utility/scores.py``). ``test``/``evaluate`` read whole trials.
        train_fraction: train on this share of each mouse's training trials (whole clips, a seeded choice; the
            subsets of smaller fractions lie inside those of larger ones): data-efficiency curves and transfer to a
            new mouse with little data (docs/training.md, "Transfer to new mice"). ``1.0``: all.
        frames: frames per training window.
        frame_step: take every ``frame_step``-th frame of the window (DwiseNeuro uses 2).
        batch_size: training windows per batch.
        eval_batch_size: whole trials per evaluation batch.
        samples_per_epoch: training windows per mouse per epoch; ``None``: one per train trial (the official loader).
        batch_mode: ``per_mouse`` (mice cycled batch by batch) or ``mixed`` (mice mixed inside a batch).
        window_sampling: how an epoch picks the trial of each window (the start is uniform over the trial):
            ``with_replacement``: a random trial per window, and in ``mixed`` batches a random mouse per window;
            ``mouse_quotas``: a random trial per window, every mouse exactly its share of windows per epoch, all
            shuffled together (DwiseNeuro: ``TrainMouseVideoDataset`` + ``ConcatMiceVideoDataset`` + shuffle,
            https://github.com/lRomul/sensorium/blob/main/src/datasets.py); ``each_trial_once``: every trial of a
            mouse once per epoch in a fresh random order (shares beyond its trials start another order), mice as in
            ``mouse_quotas`` (the starter kit's ``SubsetRandomSampler`` in ``mouse_video_loaders.py``, ViV1T's
            ``shuffle=True`` in https://github.com/bryanlimy/ViV1T/blob/main/src/viv1t/data/data.py). A mouse whose
            share runs out before the LongCycler's last cycle starts another order, as ``cycle(loader)`` does.
        dataset_size: what the loss scale ``√(trials / B)`` counts per mouse (:attr:`dataset_sizes`):
            ``all_trials``, the starter kit's ``len(dataset)`` (every trial of the mouse's folder, whatever the
            tier: https://github.com/ecker-lab/sensorium_2023/blob/main/sensorium/training/video_training_loop.py),
            or ``train_trials``, ViV1T's ``len(train_ds[mouse].dataset)`` (the trials it trains on:
            https://github.com/bryanlimy/ViV1T/blob/main/src/viv1t/criterions.py).
        normalization: ``official`` (NeuroNormalizer with the per-frame statistics), ``raw`` (DwiseNeuro) or
            ``viv1t`` (ViV1T's ``transform_mode=2`` with its own train-tier statistics). Evaluation batches are on
            the competition's scale whatever the choice (:class:`~lightning_sensorium.data.normalization.Normalizer`).
        num_workers: DataLoader worker processes.
        seed: seeds the window sampling (with epoch, rank and worker).
        storage_options: passed to fsspec for URL roots.
        with_ground_truth: add the generator's noiseless ``rates`` to evaluation batches where a store has them.
        response_scale: add ``response_scale`` ``(B, N, T)`` to every batch (``official`` normalisation only): the
            per-frame response precision the official scale multiplies each neuron by, over its mean across frames.
            The release's statistics are per frame, so the scored targets carry a gain per neuron and frame that
            no stimulus explains. :class:`~lightning_sensorium.module.SensoriumModule` then trains on the targets
            divided by this factor (each neuron's responses on one scale for all its frames) and multiplies its
            predictions by it, so they are scored on the official scale (DwiseNeuro trained on raw responses and
            multiplied its submissions by the per-frame precision, for +0.023:
            https://github.com/lRomul/sensorium, commit 20fd7a5).
        input_statistics: ``per_frame`` (the official normaliser) or ``time_averaged``: normalise videos, behaviour
            and pupil centre with statistics over all frames (``official`` normalisation only). The per-frame ones
            come from a finite number of trials and jitter from frame to frame, a fixed "ghost" every trial is seen
            through (:mod:`lightning_sensorium.data.normalization`); predictions of user stimuli follow the
            checkpoint's choice.
    """

    def __init__(
        self,
        root: str = DEFAULT_ROOT,
        mice: list[str] | None = None,
        mouse_selection: MouseSelection = "all",
        train_tiers: list[str] | None = None,
        val_tiers: list[str] | None = None,
        test_tiers: list[str] | None = None,
        infer_tiers: list[str] | None = None,
        num_folds: int | None = None,
        fold: int = 0,
        val_windows: ValWindows = "whole_trials",
        train_fraction: float = 1.0,
        frames: int = 80,
        frame_step: int = 1,
        batch_size: int = 8,
        eval_batch_size: int = 4,
        samples_per_epoch: int | None = None,
        batch_mode: Literal["per_mouse", "mixed"] = "per_mouse",
        window_sampling: WindowSampling = "with_replacement",
        dataset_size: DatasetSize = "all_trials",
        normalization: Normalization = "official",
        num_workers: int = 0,
        seed: int = 42,
        storage_options: dict[str, Any] | None = None,
        with_ground_truth: bool = True,
        response_scale: bool = False,
        input_statistics: InputStatistics = "per_frame",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.root = str(root)
        self.train_tiers = list(train_tiers or ["train"])
        self._check_folds(num_folds, fold, val_tiers)
        self.num_folds, self.fold = num_folds, fold
        self.val_tiers = [VALIDATION_FOLD] if num_folds is not None else list(val_tiers or ["oracle"])
        self.test_tiers = list(test_tiers or ["oracle", "live_test_main", "final_test_main"])
        self.infer_tiers = list(infer_tiers or ["final_test_main"])
        for name, tiers in [
            ("train_tiers", self.train_tiers),
            ("val_tiers", list(val_tiers or [])),
            ("test_tiers", self.test_tiers),
            ("infer_tiers", self.infer_tiers),
        ]:
            unknown = [t for t in tiers if t not in TIERS]
            if unknown:
                raise ValueError(f"data.{name}: unknown tier(s) {unknown}; expected some of {list(TIERS)}")
        if not 0.0 < train_fraction <= 1.0:
            raise ValueError(f"data.train_fraction={train_fraction}: expected a share in (0, 1]")
        self.train_fraction = train_fraction
        if frames < 1 or frame_step < 1:
            raise ValueError(f"data.frames={frames} and data.frame_step={frame_step} must be ≥ 1")
        self.frames, self.frame_step = frames, frame_step
        self.span = (frames - 1) * frame_step + 1  # raw frames a window covers
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.samples_per_epoch = samples_per_epoch
        self.batch_mode = batch_mode
        for name, value, allowed in [
            ("window_sampling", window_sampling, WindowSampling),
            ("val_windows", val_windows, ValWindows),
            ("dataset_size", dataset_size, DatasetSize),
        ]:
            if value not in get_args(allowed):
                raise ValueError(f"data.{name}={value!r}: expected one of {list(get_args(allowed))}")
        self.window_sampling: WindowSampling = window_sampling
        self.val_windows: ValWindows = val_windows
        self.dataset_size: DatasetSize = dataset_size
        self.normalization = normalization
        self.num_workers = num_workers
        self.seed = seed
        self.with_ground_truth = with_ground_truth
        self.response_scale = response_scale
        self.input_statistics = input_statistics

        paths = discover_stores(self.root, mice, storage_options)
        # Opening reads only metadata and the small per-trial arrays: cheap enough for __init__, which must
        # compute `neurons` because LightningCLI links it to the model at instantiation.
        stores = [MouseStore(p, storage_options=storage_options) for p in paths]
        if mouse_selection not in get_args(MouseSelection):
            raise ValueError(
                f"data.mouse_selection={mouse_selection!r}: expected one of {list(get_args(MouseSelection))}"
            )
        if mouse_selection == "competition":
            stores = _competition_mice(stores)
        self.stores: dict[str, MouseStore] = {s.mouse_id: s for s in stores}
        self.mouse_ids: list[str] = list(self.stores)
        self.normalizers = {
            m: Normalizer(s, normalization, input_statistics, response_scale) for m, s in self.stores.items()
        }
        # (trials, fold of each) per mouse: the labelled trials of train_tiers and oracle, split into folds.
        self._folds = {m: self._fold_pool(m, num_folds) for m in self.stores} if num_folds is not None else {}
        self._train_trials = {m: self._window_trials(m) for m in self.stores}
        for m, trials in self._train_trials.items():
            if len(trials) == 0:
                raise ValueError(
                    f"mouse {m}: no trial of tiers {self.train_tiers} is at least {self.span} frames long "
                    f"(data.frames={frames}, data.frame_step={frame_step})"
                )
        self._warn_if_testing_training_trials()

    @staticmethod
    def _check_folds(num_folds: int | None, fold: int, val_tiers: list[str] | None) -> None:
        if num_folds is None:
            if fold != 0:
                raise ValueError(f"data.fold={fold} needs data.num_folds (the number of folds, at least 2)")
            return
        if num_folds < 2:
            raise ValueError(f"data.num_folds={num_folds}: expected at least 2 folds (or null: no folds)")
        if not 0 <= fold < num_folds:
            raise ValueError(f"data.fold={fold}: expected a fold in 0 … {num_folds - 1} (data.num_folds={num_folds})")
        if val_tiers is not None:
            raise ValueError(
                f"data.val_tiers={val_tiers} and data.num_folds={num_folds}: with folds, validation is the held-out "
                "fold data.fold; leave data.val_tiers unset"
            )

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get a copy of the datamodule: never the trainer.
        state = self.__dict__.copy()
        state["trainer"] = None
        return state

    # ------------------------------------------------------------------------------------------ linked metadata
    @property
    def neurons(self) -> dict[str, NeuronInfo]:
        """Neuron ids, coordinates and mean (normalised) train responses per mouse, for the readouts."""
        return {
            m: NeuronInfo(
                mouse_id=m,
                unit_ids=s.unit_ids,
                coordinates=s.coordinates,
                mean_responses=self.normalizers[m].mean_responses(),
            )
            for m, s in self.stores.items()
        }

    @property
    def dataset_sizes(self) -> dict[str, int]:
        """Trials per mouse the loss scale ``√(trials / B)`` counts (``data.dataset_size``)."""
        if self.dataset_size == "train_trials":
            return {m: len(trials) for m, trials in self._train_trials.items()}
        return {m: int(s.num_trials) for m, s in self.stores.items()}

    @property
    def video_shape(self) -> tuple[int, int]:
        """Frame height and width (the same for every mouse)."""
        shapes = {s.video_shape for s in self.stores.values()}
        if len(shapes) != 1:
            raise ValueError(f"mice have different frame sizes {sorted(shapes)}; select mice with one size")
        return shapes.pop()

    def tier_trials(self, mouse: str, tiers: Sequence[str], skip_hidden: bool = True) -> np.ndarray:
        """Trial numbers of ``mouse`` in ``tiers``, without the hidden (all-zero) ones if ``skip_hidden``."""
        store = self.stores[mouse]
        trials = store.trials(list(tiers))
        return trials[~store.hidden[trials]] if skip_hidden else trials

    def _split_trials(self, mouse: str, tier: str, skip_hidden: bool = True) -> np.ndarray:
        """Trials of one tier, or of the held-out fold for :data:`VALIDATION_FOLD` (ascending)."""
        if tier == VALIDATION_FOLD and self.num_folds is not None:
            trials, folds = self._folds[mouse]
            return trials[folds == self.fold]
        return self.tier_trials(mouse, [tier], skip_hidden)

    def tier_clips(self, mouse: str, tier: str, skip_hidden: bool = True) -> np.ndarray:
        """Sorted distinct clip ids of a tier: evaluation batches carry ``clip_index`` = position in this array."""
        return np.unique(self.stores[mouse].clip_id[self._split_trials(mouse, tier, skip_hidden)])

    def selected_trials(
        self, mouse: str, tier: str, skip_hidden: bool = True, max_trials: int | None = None
    ) -> np.ndarray:
        """The trials of one tier (or the held-out fold) that whole-trial loaders read: all, or the first
        ``max_trials`` in store order."""
        trials = self._split_trials(mouse, tier, skip_hidden)
        return trials if max_trials is None else trials[:max_trials]

    def fold_trials(self, mouse: str) -> dict[int, np.ndarray]:
        """``{fold: trials}`` of ``mouse`` with ``num_folds`` (every fold, the held-out one included)."""
        if self.num_folds is None:
            raise ValueError("data.num_folds is not set: the trials are not split into folds")
        trials, folds = self._folds[mouse]
        return {k: trials[folds == k] for k in range(self.num_folds)}

    def clip_counts(self, tiers: Sequence[str]) -> dict[str, dict[str, int]]:
        """Number of distinct clips per tier and mouse (dense clip indices run over 0..count-1)."""
        return {tier: {m: len(self.tier_clips(m, tier)) for m in self.stores} for tier in tiers}

    # ----------------------------------------------------------------------------------------------- sampling
    def _fold_pool(self, mouse: str, num_folds: int) -> tuple[np.ndarray, np.ndarray]:
        """The labelled trials of ``train_tiers`` and ``oracle`` (ascending) and the fold of each."""
        trials = self.tier_trials(mouse, sorted({*self.train_tiers, "oracle"}, key=TIERS.index))
        return trials, assign_folds(self.stores[mouse].clip_id[trials], num_folds, self.seed, mouse)

    def _window_trials(self, mouse: str) -> np.ndarray:
        """The trials training windows come from: the train tiers', or every fold's but the held-out one."""
        if self.num_folds is not None:
            pool, folds = self._folds[mouse]
            trials = pool[folds != self.fold]
        else:
            trials = self.tier_trials(mouse, self.train_tiers)
        trials = trials[self.stores[mouse].length[trials] >= self.span]
        if self.train_fraction < 1.0:
            trials = clip_subset(trials, self.stores[mouse].clip_id[trials], self.train_fraction, self.seed, mouse)
        return trials

    def _warn_if_testing_training_trials(self) -> None:
        """Say so when ``test`` would score trials that training reads (a test tier in ``train_tiers`` of mice whose
        test responses are labelled, such as synthetic ones, or ``oracle`` with folds)."""
        overlap = {}
        for mouse in self.mouse_ids:
            shared = np.intersect1d(self._train_trials[mouse], self.tier_trials(mouse, self.test_tiers))
            if len(shared):
                tiers = {self.stores[mouse].tier_labels[c] for c in self.stores[mouse].tier_code[shared]}
                overlap[mouse] = sorted(tiers, key=TIERS.index)
        if overlap:
            log.warning(
                "data: training reads trials of data.test_tiers that `test`/`evaluate` score (%s): those scores are "
                "not held out (set data.train_tiers / data.test_tiers to keep them apart)",
                "; ".join(f"{m}: {', '.join(t)}" for m, t in overlap.items()),
            )

    def _draw_start(self, mouse: str, trial: int, rng: np.random.Generator) -> int:
        # Start uniform over every position where the window fits (inclusive upper bound, unlike the official
        # loader's randint(0, T - F), which never picks the last window).
        return int(rng.integers(0, int(self.stores[mouse].length[trial]) - self.span + 1))

    def _draw_window(self, mouse: str, rng: np.random.Generator) -> tuple[int, int]:
        trials = self._train_trials[mouse]
        trial = int(trials[rng.integers(len(trials))])
        return trial, self._draw_start(mouse, trial, rng)

    def training_window(self, mouse: str, rng: np.random.Generator) -> dict[str, Any]:
        """One random training window of ``mouse`` (one of its training trials, a start where the window fits), read
        as the training loader reads it but not collated: e.g. a CutMix partner."""
        trial, start = self._draw_window(mouse, rng)
        return self._read(mouse, trial, start, start + self.span, rates=False, scored=False)

    def _epoch_windows(self) -> dict[str, int]:
        """Training windows per mouse per epoch: ``samples_per_epoch``, or one per train trial."""
        return {m: self.samples_per_epoch or len(t) for m, t in self._train_trials.items()}

    def _mouse_epoch_trials(self, mouse: str, count: int, rng: np.random.Generator) -> np.ndarray:
        """The trials of ``count`` windows of ``mouse``: a fresh random order of its trials (repeated as often as
        ``count`` needs) for ``each_trial_once``, random trials for ``mouse_quotas``."""
        trials = self._train_trials[mouse]
        if self.window_sampling == "each_trial_once":
            orders = [rng.permutation(trials) for _ in range(-(-count // len(trials)))]
            return np.concatenate(orders)[:count]
        return trials[rng.integers(len(trials), size=count)]

    def epoch_plan(self, epoch: int) -> list[Plan]:
        """The global training batches of one epoch for ``mouse_quotas`` and ``each_trial_once``, drawn from
        ``(seed, epoch)`` so that every DDP rank builds the same plan and takes its share.

        ``mixed``: every mouse's windows of the epoch shuffled together and cut into batches (the last one
        smaller), as a shuffled ``DataLoader`` over DwiseNeuro's ``ConcatMiceVideoDataset``. ``per_mouse``: the
        LongCycler order, mouse ``k mod M`` for global batch ``k``, each mouse's windows cut into batches (the
        last one of its epoch smaller, as ``drop_last=False``), a mouse that runs out starting another epoch of
        its windows, as neuralpredictors' ``cycle`` restarts its loader.
        """
        rng = np.random.default_rng([self.seed, epoch])
        counts = self._epoch_windows()
        b = self.batch_size
        picks: list[list[tuple[str, int]]]
        if self.batch_mode == "mixed":
            windows = [(m, int(t)) for m in self.mouse_ids for t in self._mouse_epoch_trials(m, counts[m], rng)]
            windows = [windows[i] for i in rng.permutation(len(windows))]
            picks = [windows[i : i + b] for i in range(0, len(windows), b)]
        else:

            def batches(mouse: str) -> Iterator[list[tuple[str, int]]]:
                while True:
                    trials = self._mouse_epoch_trials(mouse, counts[mouse], rng)
                    for i in range(0, len(trials), b):
                        yield [(mouse, int(t)) for t in trials[i : i + b]]

            streams = {m: batches(m) for m in self.mouse_ids}
            mice = self.mouse_ids
            picks = [next(streams[mice[k % len(mice)]]) for k in range(self._epoch_batches())]
        return [[(m, t, self._draw_start(m, t, rng)) for m, t in batch] for batch in picks]

    def official_window_start(self, mouse: str, trial: int, epoch: int) -> int:
        """First frame of the ``val_windows="official"`` window of a trial in an epoch: uniform in
        ``[0, length - 80)`` as neuralpredictors' ``Subsequence(offset=-1)`` draws it
        (``np.random.randint(0, t - frames)``:
        https://github.com/sinzlab/neuralpredictors/blob/main/neuralpredictors/data/transforms.py), from
        ``(seed, epoch, mouse, trial)``: the same window whatever the batching or the number of ranks."""
        rng = np.random.default_rng([self.seed, epoch, _mouse_key(mouse), int(trial)])
        return int(rng.integers(0, max(int(self.stores[mouse].length[trial]) - OFFICIAL_VAL_FRAMES, 1)))

    def _read(
        self,
        mouse: str,
        trial: int,
        start: int,
        stop: int,
        rates: bool = True,
        step: int | None = None,
        scored: bool = True,
    ) -> dict[str, Any]:
        """One sample: normalised tensors, neurons before time. Reads ``[start, stop)`` then subsamples by step.

        ``rates``: add the noiseless rates where :attr:`with_ground_truth` and the store has them (evaluation
        reads; no training loss reads them, so training windows skip them: a fifth of a window's reading).
        ``step``: default ``frame_step`` for a training window's span, else every frame. ``scored``: an evaluation
        read, responses on the competition's scale (:class:`Normalizer`); training windows pass False (the
        responses the loss trains on)."""
        store = self.stores[mouse]
        want_rates = rates and self.with_ground_truth and store.has_ground_truth
        raw = store.read(trial, start, stop, rates=want_rates)
        if step is None:
            step = self.frame_step if stop - start == self.span else 1
        raw = {k: v[::step] for k, v in raw.items()}  # (T, ...) every step-th frame
        x = self.normalizers[mouse](raw, np.arange(start, stop, step), scored=scored)
        sample: dict[str, Any] = {
            "mouse_id": mouse,
            "trial": trial,
            "video": torch.from_numpy(np.ascontiguousarray(x["videos"]))[None],  # (1, T, H, W)
            "behavior": torch.from_numpy(np.ascontiguousarray(x["behavior"].T)),  # (2, T)
            "pupil_center": torch.from_numpy(np.ascontiguousarray(x["pupil_center"].T)),  # (2, T)
            "responses": torch.from_numpy(np.ascontiguousarray(x["responses"].T)),  # (N, T)
            "clip_id": int(store.clip_id[trial]),
        }
        if want_rates:
            sample["rates"] = torch.from_numpy(np.ascontiguousarray(x["rates"].T))  # (N, T)
        if "response_scale" in x:  # model scale → the targets' (data.response_scale; scored reads of raw/viv1t)
            sample["response_scale"] = torch.from_numpy(np.ascontiguousarray(x["response_scale"].T))  # (N, T)
        return sample

    def _collate(self, samples: list[dict[str, Any]]) -> Batch:
        """Stack samples, zero-padding time to the longest; ``length`` keeps each sample's valid frames."""
        t_max = max(s["video"].shape[1] for s in samples)

        def pad(x: torch.Tensor) -> torch.Tensor:
            if x.shape[-1 if x.dim() != 4 else 1] == t_max:
                return x  # nothing to pad (every training window): no copy before the stack
            return (
                torch.nn.functional.pad(x, (0, 0, 0, 0, 0, t_max - x.shape[1]))
                if x.dim() == 4
                else (torch.nn.functional.pad(x, (0, t_max - x.shape[-1])))
            )

        mice = [s["mouse_id"] for s in samples]
        batch: Batch = {
            "video": torch.stack([pad(s["video"]) for s in samples]),  # (B, 1, T, H, W)
            "behavior": torch.stack([pad(s["behavior"]) for s in samples]),  # (B, 2, T)
            "pupil_center": torch.stack([pad(s["pupil_center"]) for s in samples]),  # (B, 2, T)
            "length": torch.tensor([s["video"].shape[1] for s in samples]),
            "trial": torch.tensor([s["trial"] for s in samples]),
            "clip_id": torch.tensor([s["clip_id"] for s in samples]),
        }
        if len(set(mice)) == 1:
            batch["mouse_id"] = mice[0]
            batch["responses"] = torch.stack([pad(s["responses"]) for s in samples])  # (B, N, T)
            if "rates" in samples[0]:
                batch["rates"] = torch.stack([pad(s["rates"]) for s in samples])  # (B, N, T)
            if "response_scale" in samples[0]:
                batch["response_scale"] = torch.stack([pad(s["response_scale"]) for s in samples])  # (B, N, T)
        else:
            batch["mouse_id"] = mice
            batch["responses"] = [pad(s["responses"]) for s in samples]  # B × (N_mouse, T)
            if "response_scale" in samples[0]:
                batch["response_scale"] = [pad(s["response_scale"]) for s in samples]  # B × (N_mouse, T)
        return batch

    def example_batch(self, device: str | torch.device = "meta") -> Batch:
        """A training batch's model inputs with their shapes and no data (``device="meta"``: nothing allocated), for
        estimates made before anything is read: ``video (B, 1, T, H, W)``, ``behavior`` and ``pupil_center``
        ``(B, 2, T)``, and the mouse with the most neurons (``mixed`` batches: every mouse, in turn)."""
        b, t = self.batch_size, self.frames
        h, w = self.video_shape
        largest = max(self.mouse_ids, key=lambda m: self.stores[m].num_neurons)
        mice: str | list[str] = (
            largest if self.batch_mode == "per_mouse" else [self.mouse_ids[i % len(self.mouse_ids)] for i in range(b)]
        )
        return {
            "mouse_id": mice,
            "video": torch.empty(b, 1, t, h, w, device=device),  # (B, 1, T, H, W)
            "behavior": torch.empty(b, 2, t, device=device),  # (B, 2, T)
            "pupil_center": torch.empty(b, 2, t, device=device),  # (B, 2, T)
        }

    # ------------------------------------------------------------------------------------------------ loaders
    def _epoch_batches(self) -> int:
        per_mouse = list(self._epoch_windows().values())
        if self.batch_mode == "per_mouse":
            # LongCycler: every mouse contributes max-over-mice batches per epoch.
            return len(self.mouse_ids) * max(math.ceil(n / self.batch_size) for n in per_mouse)
        return math.ceil(sum(per_mouse) / self.batch_size)

    def train_dataloader(self) -> DataLoader:
        n = self._epoch_batches()
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        sampler = _WindowPlans(self, n, rank=rank, world_size=world)
        return _ResumableLoader(self, _WindowReader(self, n), sampler, self.num_workers)

    def trial_loader(self, tiers: Sequence[str], skip_hidden: bool = True, max_trials: int | None = None) -> DataLoader:
        """Whole-trial batches of any ``tiers`` (hidden trials too unless ``skip_hidden``), at most ``max_trials``
        per mouse and tier: what ``evaluate``, ``predict`` and ``submit`` read."""
        unknown = [t for t in tiers if t not in TIERS]
        if unknown:
            raise ValueError(f"tiers: unknown tier(s) {unknown}; expected some of {list(TIERS)}")
        if max_trials is not None and max_trials < 1:
            raise ValueError(f"max_trials={max_trials}: expected a positive number of trials per mouse and tier")
        return self._eval_loader(tiers, skip_hidden, max_trials)

    def _eval_loader(
        self, tiers: Sequence[str], skip_hidden: bool = True, max_trials: int | None = None, window: int | None = None
    ) -> DataLoader:
        ds = EvalTrials(self, tiers, self.eval_batch_size, skip_hidden, max_trials, window)
        sampler = None
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        if world > 1 or window is not None:
            # Lightning's default DistributedSampler pads by repeating trials; this one scores each trial once (and
            # hands windowed datasets the epoch, which Lightning sets before each validation of a fit).
            sampler = PaddedEvalSampler(ds, world, rank, with_epoch=window is not None)
        return DataLoader(ds, batch_size=None, sampler=sampler, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        window = OFFICIAL_VAL_FRAMES if self.val_windows == "official" else None
        return self._eval_loader(self.val_tiers, window=window)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_tiers)

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.infer_tiers, skip_hidden=False)
