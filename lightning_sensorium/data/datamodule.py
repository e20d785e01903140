"""SensoriumDataModule: streams per-mouse zarr stores into training windows and whole-trial evaluation batches.

Training draws random windows of ``frames`` frames (every ``frame_step``-th frame) from random trials of the
train tiers. Evaluation reads whole trials (up to their valid length) so the official metrics see every scored
frame. Batches hold one mouse (``batch_mode="per_mouse"``: the official LongCycler / ViV1T scheme, mice cycled
batch by batch) or several (``batch_mode="mixed"``: DwiseNeuro; then ``mouse_id`` is a list and responses are
given per sample in ``responses`` as a list).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_sensorium.data.batch import NeuronInfo
from lightning_sensorium.data.layout import TIERS
from lightning_sensorium.data.normalization import InputStatistics, Normalizer
from lightning_sensorium.data.store import MouseStore, is_url

log = logging.getLogger(__name__)

#: Where `make demo` puts the synthetic stores; the default data root.
DEFAULT_ROOT = "data/stores"

Batch = dict[str, Any]


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

    A ``DistributedSampler`` so Lightning neither replaces it under DDP nor forgets to call ``set_epoch``: every
    rank draws its own stream from ``(seed, epoch, rank)``, and all ranks yield the same number of batches so DDP
    never waits on a rank that ran dry. Mice are cycled by global batch number (the official LongCycler order)
    in ``per_mouse`` mode, and drawn uniformly per sample in ``mixed`` mode.
    """

    def __init__(self, dm: SensoriumDataModule, epoch_batches: int, rank: int = 0, world_size: int = 1) -> None:
        batches: Any = range(epoch_batches)  # only its length matters to DistributedSampler
        super().__init__(batches, num_replicas=world_size, rank=rank, shuffle=False, seed=dm.seed)
        self.dm = dm
        self.local_batches = math.ceil(epoch_batches / world_size)

    def __len__(self) -> int:
        return self.local_batches

    def __iter__(self) -> Iterator[list[tuple[str, int, int]]]:  # type: ignore[override,unused-ignore]
        rng = np.random.default_rng([self.dm.seed, self.epoch, self.rank])
        mice = self.dm.mouse_ids
        for k in range(self.local_batches):
            if self.dm.batch_mode == "per_mouse":
                chosen = [mice[(k * self.num_replicas + self.rank) % len(mice)]] * self.dm.batch_size
            else:
                chosen = [mice[i] for i in rng.integers(0, len(mice), size=self.dm.batch_size)]
            yield [(m, *self.dm._draw_window(m, rng)) for m in chosen]


class _WindowReader(Dataset):
    """Reads and collates the windows of one batch plan (runs in DataLoader workers)."""

    def __init__(self, dm: SensoriumDataModule, epoch_batches: int) -> None:
        self.dm = dm
        self.epoch_batches = epoch_batches

    def __len__(self) -> int:
        return self.epoch_batches

    def __getitem__(self, plan: list[tuple[str, int, int]]) -> Batch:  # type: ignore[override,unused-ignore]
        return self.dm._collate([self.dm._read(m, t, s, s + self.dm.span, rates=False) for m, t, s in plan])


class EvalTrials(Dataset):
    """Whole trials of the evaluation tiers, pre-grouped into batches of one mouse and one tier."""

    def __init__(
        self,
        dm: SensoriumDataModule,
        tiers: Sequence[str],
        batch_size: int,
        skip_hidden: bool,
        max_trials: int | None = None,
    ) -> None:
        self.dm = dm
        self.groups: list[tuple[str, str, list[int]]] = []
        # Dense clip index per (tier, mouse): the repeat metrics keep one slot per clip.
        self.clips: dict[tuple[str, str], np.ndarray] = {}
        for mouse in dm.mouse_ids:
            store = dm.stores[mouse]
            for tier in tiers:
                trials = dm.selected_trials(mouse, tier, skip_hidden, max_trials)
                self.clips[tier, mouse] = dm.tier_clips(mouse, tier, skip_hidden)
                # Sort by length so a batch pads little.
                trials = trials[np.argsort(store.length[trials], kind="stable")]
                for i in range(0, len(trials), batch_size):
                    self.groups.append((mouse, tier, [int(t) for t in trials[i : i + batch_size]]))

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> Batch:
        padding = index < 0  # see PaddedEvalSampler: a rank's stand-in batch, never scored or written
        mouse, tier, trials = self.groups[~index if padding else index]
        store = self.dm.stores[mouse]
        samples = [self.dm._read(mouse, t, 0, int(store.length[t])) for t in trials]
        batch = self.dm._collate(samples)
        batch["tier"] = tier
        batch["clip_index"] = torch.from_numpy(np.searchsorted(self.clips[tier, mouse], batch["clip_id"].numpy()))
        if padding:
            batch["padding"] = True
        return batch


class PaddedEvalSampler(DistributedSampler):
    """Each evaluation batch on exactly one rank (rank ``r`` takes batches ``r, r + world, ...``), and at least one
    batch on every rank.

    Lightning's ``UnrepeatedDistributedSampler`` also scores each batch once but refuses fewer batches than ranks
    (and a rank without a batch would skip the evaluation loop while the others wait in the metrics' all-reduce).
    Such a rank gets one *padding* batch instead: index ``~i`` (negative), which :class:`EvalTrials` reads as batch
    ``i`` marked ``padding``, and the module and the writers skip. A ``DistributedSampler``, so Lightning keeps it.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        n = len(dataset)  # type: ignore[arg-type]
        self.indices = list(range(rank, n, num_replicas)) or ([~(rank % n)] if n else [])

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SensoriumDataModule(L.LightningDataModule):
    """Per-mouse zarr stores → training windows and whole-trial evaluation batches.

    Args:
        root: folder (or fsspec URL) holding ``<mouse_id>.zarr`` stores.
        mice: mouse ids to use (default: every store under ``root``; required for URLs).
        train_tiers: tiers whose trials are sampled for training.
        val_tiers: tiers evaluated during validation (the official validation tier is ``oracle``).
        test_tiers: tiers evaluated by ``test`` / ``evaluate`` (hidden tiers are skipped).
        infer_tiers: tiers predicted by ``predict``.
        frames: frames per training window.
        frame_step: take every ``frame_step``-th frame of the window (DwiseNeuro uses 2).
        batch_size: training windows per batch.
        eval_batch_size: whole trials per evaluation batch.
        samples_per_epoch: training windows per mouse per epoch; ``None``: one per train trial (the official loader).
        batch_mode: ``per_mouse`` (mice cycled batch by batch) or ``mixed`` (mice mixed inside a batch).
        normalization: ``official`` (NeuroNormalizer with the per-frame statistics) or ``raw``.
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
        train_tiers: list[str] | None = None,
        val_tiers: list[str] | None = None,
        test_tiers: list[str] | None = None,
        infer_tiers: list[str] | None = None,
        frames: int = 80,
        frame_step: int = 1,
        batch_size: int = 8,
        eval_batch_size: int = 4,
        samples_per_epoch: int | None = None,
        batch_mode: Literal["per_mouse", "mixed"] = "per_mouse",
        normalization: Literal["official", "raw"] = "official",
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
        self.val_tiers = list(val_tiers or ["oracle"])
        self.test_tiers = list(test_tiers or ["oracle", "live_test_main", "final_test_main"])
        self.infer_tiers = list(infer_tiers or ["final_test_main"])
        for name, tiers in [
            ("train_tiers", self.train_tiers),
            ("val_tiers", self.val_tiers),
            ("test_tiers", self.test_tiers),
            ("infer_tiers", self.infer_tiers),
        ]:
            unknown = [t for t in tiers if t not in TIERS]
            if unknown:
                raise ValueError(f"data.{name}: unknown tier(s) {unknown}; expected some of {list(TIERS)}")
        if frames < 1 or frame_step < 1:
            raise ValueError(f"data.frames={frames} and data.frame_step={frame_step} must be ≥ 1")
        self.frames, self.frame_step = frames, frame_step
        self.span = (frames - 1) * frame_step + 1  # raw frames a window covers
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.samples_per_epoch = samples_per_epoch
        self.batch_mode = batch_mode
        self.normalization = normalization
        self.num_workers = num_workers
        self.seed = seed
        self.with_ground_truth = with_ground_truth
        if response_scale and normalization != "official":
            raise ValueError(
                f"data.response_scale is the official normalisation's per-frame factor; "
                f"data.normalization is {normalization!r} (use official, or response_scale: false)"
            )
        self.response_scale = response_scale
        self.input_statistics = input_statistics

        paths = discover_stores(self.root, mice, storage_options)
        # Opening reads only metadata and the small per-trial arrays: cheap enough for __init__, which must
        # compute `neurons` because LightningCLI links it to the model at instantiation.
        stores = [MouseStore(p, storage_options=storage_options) for p in paths]
        self.stores: dict[str, MouseStore] = {s.mouse_id: s for s in stores}
        self.mouse_ids: list[str] = list(self.stores)
        self.normalizers = {m: Normalizer(s, normalization, input_statistics) for m, s in self.stores.items()}
        self._train_trials = {m: self._window_trials(m) for m in self.stores}
        for m, trials in self._train_trials.items():
            if len(trials) == 0:
                raise ValueError(
                    f"mouse {m}: no trial of tiers {self.train_tiers} is at least {self.span} frames long "
                    f"(data.frames={frames}, data.frame_step={frame_step})"
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
        """Trials per mouse over all tiers: the official loss scale uses sqrt(len(dataset) / batch_size)."""
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

    def tier_clips(self, mouse: str, tier: str, skip_hidden: bool = True) -> np.ndarray:
        """Sorted distinct clip ids of a tier: evaluation batches carry ``clip_index`` = position in this array."""
        return np.unique(self.stores[mouse].clip_id[self.tier_trials(mouse, [tier], skip_hidden)])

    def selected_trials(
        self, mouse: str, tier: str, skip_hidden: bool = True, max_trials: int | None = None
    ) -> np.ndarray:
        """The trials of one tier that whole-trial loaders read: all, or the first ``max_trials`` in store order."""
        trials = self.tier_trials(mouse, [tier], skip_hidden)
        return trials if max_trials is None else trials[:max_trials]

    def clip_counts(self, tiers: Sequence[str]) -> dict[str, dict[str, int]]:
        """Number of distinct clips per tier and mouse (dense clip indices run over 0..count-1)."""
        return {tier: {m: len(self.tier_clips(m, tier)) for m in self.stores} for tier in tiers}

    # ----------------------------------------------------------------------------------------------- sampling
    def _window_trials(self, mouse: str) -> np.ndarray:
        trials = self.tier_trials(mouse, self.train_tiers)
        return trials[self.stores[mouse].length[trials] >= self.span]

    def _draw_window(self, mouse: str, rng: np.random.Generator) -> tuple[int, int]:
        trials = self._train_trials[mouse]
        trial = int(trials[rng.integers(len(trials))])
        # Start uniform over every position where the window fits (inclusive upper bound, unlike the official
        # loader's randint(0, T - F), which never picks the last window).
        start = int(rng.integers(0, int(self.stores[mouse].length[trial]) - self.span + 1))
        return trial, start

    def _read(self, mouse: str, trial: int, start: int, stop: int, rates: bool = True) -> dict[str, Any]:
        """One sample: normalised tensors, neurons before time. Reads ``[start, stop)`` then subsamples by step.

        ``rates``: add the noiseless rates where :attr:`with_ground_truth` and the store has them (evaluation
        reads; no training loss reads them, so training windows skip them: a fifth of a window's reading)."""
        store = self.stores[mouse]
        want_rates = rates and self.with_ground_truth and store.has_ground_truth
        raw = store.read(trial, start, stop, rates=want_rates)
        step = self.frame_step if stop - start == self.span else 1
        raw = {k: v[::step] for k, v in raw.items()}  # (T, ...) every step-th frame
        x = self.normalizers[mouse](raw, np.arange(start, stop, step))
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
        if self.response_scale:
            scale = self.normalizers[mouse].response_scale(np.arange(start, stop, step))  # (T, N)
            sample["response_scale"] = torch.from_numpy(np.ascontiguousarray(scale.T))  # (N, T)
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
        per_mouse = [self.samples_per_epoch or len(t) for t in self._train_trials.values()]
        if self.batch_mode == "per_mouse":
            # LongCycler: every mouse contributes max-over-mice batches per epoch.
            return len(self.mouse_ids) * max(math.ceil(n / self.batch_size) for n in per_mouse)
        return math.ceil(sum(per_mouse) / self.batch_size)

    def train_dataloader(self) -> DataLoader:
        n = self._epoch_batches()
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        sampler = _WindowPlans(self, n, rank=rank, world_size=world)
        return DataLoader(_WindowReader(self, n), batch_size=None, sampler=sampler, num_workers=self.num_workers)

    def trial_loader(self, tiers: Sequence[str], skip_hidden: bool = True, max_trials: int | None = None) -> DataLoader:
        """Whole-trial batches of any ``tiers`` (hidden trials too unless ``skip_hidden``), at most ``max_trials``
        per mouse and tier: what ``evaluate``, ``predict`` and ``submit`` read."""
        unknown = [t for t in tiers if t not in TIERS]
        if unknown:
            raise ValueError(f"tiers: unknown tier(s) {unknown}; expected some of {list(TIERS)}")
        if max_trials is not None and max_trials < 1:
            raise ValueError(f"max_trials={max_trials}: expected a positive number of trials per mouse and tier")
        return self._eval_loader(tiers, skip_hidden, max_trials)

    def _eval_loader(self, tiers: Sequence[str], skip_hidden: bool = True, max_trials: int | None = None) -> DataLoader:
        ds = EvalTrials(self, tiers, self.eval_batch_size, skip_hidden, max_trials)
        sampler = None
        if self.trainer is not None and self.trainer.world_size > 1:
            # Lightning's default DistributedSampler pads by repeating trials; this one scores each trial once.
            sampler = PaddedEvalSampler(ds, self.trainer.world_size, self.trainer.global_rank)
        return DataLoader(ds, batch_size=None, sampler=sampler, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_tiers)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_tiers)

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.infer_tiers, skip_hidden=False)
