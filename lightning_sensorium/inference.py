"""`lightning-sensorium infer`: predictions of a checkpoint (or ensemble) for any tier, or for new stimuli, streamed
into a zarr store (the inference policy itself, windows and phases, is :mod:`lightning_sensorium.predictors`).

* Tiers (hidden test tiers included): whole trials read from the stores, written by
  :class:`~lightning_sensorium.callbacks.prediction_writer.ZarrPredictionWriter` batch by batch.
* User stimuli — the in-silico experiment: a grey-level video ``(T, H, W)`` in 0..255 saved as ``.npy``, with
  optional behaviour ``(T, 2)`` [pupil size, running speed] and pupil centre ``(T, 2)`` [x, y] ``.npy`` files, or a
  folder of videos (``NAME.npy`` with optional ``NAME.behavior.npy`` / ``NAME.pupil_center.npy`` beside it).
  Missing behaviour / pupil centre default to the chosen mouse's mean over its train frames. Inputs are normalised
  like that mouse's recorded trials: with its per-frame statistics where they exist (the first ≤ 300 frames) and
  their time average after that, so videos longer than the recordings work too.

Predictions of tiers are on the competition's scale (raw responses × the official per-frame precision) whatever
the model was trained on; predictions of user stimuli, which have no frame statistics, are on the model's own scale
(:mod:`lightning_sensorium.data.normalization`). Frames the core cannot predict (its temporal receptive field) are
NaN.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_sensorium.callbacks.progress import quiet_console
from lightning_sensorium.data.normalization import InputStatistics, Normalization, Normalizer
from lightning_sensorium.data.store import MouseStore

#: Suffixes of the optional per-video behaviour files in a stimulus folder.
BEHAVIOR_SUFFIX = ".behavior.npy"
PUPIL_SUFFIX = ".pupil_center.npy"


def run_predict_loop(
    model: L.LightningModule,
    loader: Any,
    callbacks: Sequence[L.Callback],
    accelerator: str = "auto",
    progress: bool = True,
) -> None:
    """``Trainer.predict`` on one device, outputs consumed by ``callbacks`` only (nothing kept in memory)."""
    quiet_console()
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        callbacks=list(callbacks),
    )
    with warnings.catch_warnings():
        # The writers key rows by the batches' own trial numbers, not by sampler indices.
        warnings.filterwarnings("ignore", message=".*infer the batch indices.*")
        trainer.predict(model, dataloaders=loader, return_predictions=False)


def infer_tiers(
    ckpt_paths: Sequence[str | Path],
    out: str | Path,
    *,
    data: dict[str, Any] | None = None,
    tiers: Sequence[str] | None = None,
    max_trials: int | None = None,
    accelerator: str = "auto",
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Predict whole trials of ``tiers`` (default: the datamodule's ``infer_tiers``) into the zarr store ``out``."""
    from lightning_sensorium.callbacks.prediction_writer import ZarrPredictionWriter, tier_layouts
    from lightning_sensorium.ensemble import load_ensemble

    model, dm = load_ensemble(ckpt_paths, data)
    tiers = list(tiers or dm.infer_tiers)
    layouts = tier_layouts(dm, tiers, max_trials)
    if not layouts:
        raise ValueError(f"tiers {tiers}: the selected mice have no trial in these tiers")
    writer = ZarrPredictionWriter(
        str(out), overwrite=overwrite, layouts=layouts, attrs={"checkpoints": model.checkpoints, "data_root": dm.root}
    )
    writer.check_target()
    run_predict_loop(
        model, dm.trial_loader(tiers, skip_hidden=False, max_trials=max_trials), [writer], accelerator, progress
    )
    return Path(out)


# ------------------------------------------------------------------------------------------------ user stimuli
@dataclass
class Stimulus:
    """One user stimulus: ``video (T, H, W)`` grey levels 0..255, optional ``behavior``/``pupil_center`` (T, 2)."""

    name: str
    video: np.ndarray
    behavior: np.ndarray | None = None
    pupil_center: np.ndarray | None = None


def _load_array(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise ValueError(f"{what} {path}: not a numeric .npy array ({err})") from err
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{what} {path}: dtype {arr.dtype} is not numeric")
    return arr


def load_stimuli(
    path: str | Path, behavior: str | Path | None = None, pupil_center: str | Path | None = None
) -> list[Stimulus]:
    """Read one video ``.npy`` (with optional behaviour / pupil files) or a folder of them (see module docstring)."""
    path = Path(path)
    if path.is_dir():
        if behavior is not None or pupil_center is not None:
            raise ValueError(
                "behavior and pupil_center go with a single video; in a folder put NAME.behavior.npy beside"
            )
        videos = sorted(
            p for p in path.glob("*.npy") if not p.name.endswith(BEHAVIOR_SUFFIX) and not p.name.endswith(PUPIL_SUFFIX)
        )
        if not videos:
            raise FileNotFoundError(f"stimulus folder {path}: holds no video .npy file")
        out = []
        for v in videos:
            stem = v.name[: -len(".npy")]
            b, p = v.with_name(stem + BEHAVIOR_SUFFIX), v.with_name(stem + PUPIL_SUFFIX)
            out.append(
                Stimulus(
                    stem,
                    _load_array(v, "stimulus"),
                    _load_array(b, "behaviour") if b.is_file() else None,
                    _load_array(p, "pupil centre") if p.is_file() else None,
                )
            )
        return out
    video = _load_array(path, "stimulus")
    return [
        Stimulus(
            path.name[: -len(".npy")] if path.name.endswith(".npy") else path.name,
            video,
            None if behavior is None else _load_array(Path(behavior), "behavior"),
            None if pupil_center is None else _load_array(Path(pupil_center), "pupil_center"),
        )
    ]


def check_stimulus(stim: Stimulus, video_shape: tuple[int, int]) -> None:
    """Raise a clear error unless the stimulus has the shapes and ranges the model expects."""
    v = stim.video
    if v.ndim != 3 or tuple(v.shape[1:]) != tuple(video_shape):
        hint = (
            " (the release stores (H, W, T): transpose to (T, H, W))"
            if v.ndim == 3 and v.shape[:2] == video_shape
            else ""
        )
        expected = f"(T, {video_shape[0]}, {video_shape[1]})"
        raise ValueError(f"stimulus {stim.name}: video shape {tuple(v.shape)}, expected {expected}{hint}")
    if not np.isfinite(v).all():
        raise ValueError(f"stimulus {stim.name}: the video holds NaN/inf")
    if v.min() < 0 or v.max() > 255:
        raise ValueError(f"stimulus {stim.name}: grey levels must lie in 0..255, found {v.min():g}..{v.max():g}")
    for what, arr in (("behavior", stim.behavior), ("pupil_center", stim.pupil_center)):
        if arr is None:
            continue
        if arr.shape != (v.shape[0], 2):
            raise ValueError(f"stimulus {stim.name}: {what} shape {tuple(arr.shape)}, expected ({v.shape[0]}, 2)")
        if not np.isfinite(arr).all():
            raise ValueError(f"stimulus {stim.name}: {what} holds NaN/inf")


class StimulusInputs:
    """Turns raw user stimuli into model inputs normalised like one mouse's recordings.

    Args:
        store: the mouse whose statistics (and training means for missing behaviour) are used.
        normalization: the checkpoint's ``data.normalization`` (``official``, ``raw`` or ``viv1t``).
        input_statistics: the checkpoint's ``data.input_statistics`` (``per_frame`` or ``time_averaged``).
        normalizer: the data module's normaliser of this mouse, to reuse its statistics (then ``normalization``
            and ``input_statistics`` are its own); None: built from the two options.
    """

    def __init__(
        self,
        store: MouseStore,
        normalization: Normalization = "official",
        input_statistics: InputStatistics = "per_frame",
        normalizer: Normalizer | None = None,
    ) -> None:
        self.store = store
        self.normalization = normalizer.mode if normalizer is not None else normalization
        train = store.trials("train")
        if train.size == 0:
            train = np.arange(store.num_trials)
        valid = np.arange(store.t_pad)[None] < store.length[train][:, None]  # (trials, T_pad)
        self.mean_behavior = store.behavior[train][valid].mean(0).astype(np.float32)  # (2,)
        self.mean_pupil = store.pupil_center[train][valid].mean(0).astype(np.float32)  # (2,)
        #: The normaliser's per-frame input transform ``(x − shift) · gain`` over the frames that have statistics;
        #: empty for ``raw``.
        self.per_frame: dict[str, np.ndarray] = {}
        if self.normalization == "raw":
            return
        norm = normalizer if normalizer is not None else Normalizer(store, normalization, input_statistics)
        # Frames with statistics: the leading run of finite frames (≤ 300 in the release).
        self.stat_frames = norm.input_frames
        if self.stat_frames == 0:
            raise ValueError(f"{store.mouse_id}: the store has no frame with finite statistics")
        self.per_frame = {name: arr[: self.stat_frames] for name, arr in norm.inputs.items()}  # (F, ...)

    def statistic(self, name: str, frames: int) -> np.ndarray:
        """Per-frame statistic for ``frames`` frames: recorded ones, then their time average."""
        x = self.per_frame[name]
        if frames <= len(x):
            return x[:frames]
        tail = np.broadcast_to(x.mean(0, keepdims=True), (frames - len(x), *x.shape[1:]))
        return np.concatenate([x, tail])

    def __call__(self, stim: Stimulus, index: int) -> dict[str, Any]:
        """One batch of one stimulus (batch size 1)."""
        check_stimulus(stim, self.store.video_shape)
        t = stim.video.shape[0]
        video = stim.video.astype(np.float32)  # (T, H, W)
        behavior = (np.broadcast_to(self.mean_behavior, (t, 2)) if stim.behavior is None else stim.behavior).astype(
            np.float32
        )
        pupil = (np.broadcast_to(self.mean_pupil, (t, 2)) if stim.pupil_center is None else stim.pupil_center).astype(
            np.float32
        )
        if self.per_frame:
            video = (video - self.statistic("video_shift", t)) * self.statistic("video_gain", t)
            behavior = (behavior - self.statistic("behavior_shift", t)) * self.statistic("behavior_gain", t)
            pupil = (pupil - self.statistic("pupil_shift", t)) * self.statistic("pupil_gain", t)
        return {
            "mouse_id": self.store.mouse_id,
            "tier": "user",
            "video": torch.from_numpy(np.ascontiguousarray(video))[None, None],  # (1, 1, T, H, W)
            "behavior": torch.from_numpy(np.ascontiguousarray(behavior.T))[None],  # (1, 2, T)
            "pupil_center": torch.from_numpy(np.ascontiguousarray(pupil.T))[None],  # (1, 2, T)
            "length": torch.tensor([t]),
            "trial": torch.tensor([index]),
        }


class _StimulusBatches(Dataset):
    def __init__(self, stimuli: Sequence[Stimulus], inputs: StimulusInputs) -> None:
        self.stimuli, self.inputs = list(stimuli), inputs

    def __len__(self) -> int:
        return len(self.stimuli)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.inputs(self.stimuli[index], index)


def infer_stimuli(
    ckpt_paths: Sequence[str | Path],
    stimulus: str | Path,
    out: str | Path,
    *,
    mouse: str | None = None,
    behavior: str | Path | None = None,
    pupil_center: str | Path | None = None,
    data: dict[str, Any] | None = None,
    accelerator: str = "auto",
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Predict ``mouse``'s responses to user stimuli into the zarr store ``out`` (one row per stimulus)."""
    from lightning_sensorium.callbacks.prediction_writer import PredictionLayout, ZarrPredictionWriter
    from lightning_sensorium.ensemble import load_ensemble

    stimuli = load_stimuli(stimulus, behavior, pupil_center)
    model, dm = load_ensemble(ckpt_paths, {**(data or {}), **({"mice": [mouse]} if mouse else {})})
    if mouse is None:
        if len(dm.mouse_ids) != 1:
            raise ValueError(f"mouse: choose the mouse whose neurons to predict, one of {dm.mouse_ids}")
        mouse = dm.mouse_ids[0]
    store = dm.stores[mouse]
    inputs = StimulusInputs(store, normalizer=dm.normalizers[mouse])
    for s in stimuli:
        check_stimulus(s, store.video_shape)  # every file checked before any prediction
    lengths = np.array([s.video.shape[0] for s in stimuli], dtype=np.int32)
    layout = PredictionLayout(
        mouse_id=mouse,
        keys=np.arange(len(stimuli)),
        frames=int(lengths.max()),
        unit_ids=np.asarray(store.unit_ids),
        columns={"trial": np.arange(len(stimuli), dtype=np.int64), "length": lengths},
        attrs={"stimuli": [s.name for s in stimuli], "source": str(stimulus)},
    )
    writer = ZarrPredictionWriter(
        str(out), overwrite=overwrite, layouts=[layout], attrs={"checkpoints": model.checkpoints}
    )
    writer.check_target()
    loader = DataLoader(_StimulusBatches(stimuli, inputs), batch_size=None)
    run_predict_loop(model, loader, [writer], accelerator, progress)
    return Path(out)
