"""What an in-silico experiment runs on: a *responder*, raw stimuli in, predicted rates out.

Every responder takes the stimulus as the experimenter describes it — grey levels 0..255 ``video (B, 1, T, H, W)``,
raw ``behavior (B, 2, T)`` [pupil size, running speed] and ``pupil_center (B, 2, T)`` in camera px — and returns
rates ``(B, N, T)`` at 30 Hz (NaN where it cannot predict). :class:`TrainedModel` normalises those inputs exactly as
its data module normalised the recorded trials (through :class:`~lightning_sensorium.inference.StimulusInputs`, the
one home of that conversion); :class:`GroundTruth` is the synthetic mouse's own generator
(:mod:`lightning_sensorium.data.digital_twin`), which takes grey levels directly and knows the true parameters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_sensorium.data import digital_twin as twin
from lightning_sensorium.data.layout import FPS
from lightning_sensorium.data.normalization import over_time
from lightning_sensorium.data.synthetic import load_neuron_parameters


class Responder(ABC):
    """A mouse's neurons as a function of raw stimuli (see the module docstring).

    Attributes:
        mouse_id: the mouse.
        unit_ids: ``(N,)`` its neurons' ids, in output order.
        grey: the mean grey level of its training videos (the blank screen of every experiment).
        behavior_mean, behavior_std: ``(2,)`` [pupil size, running speed] over its training frames.
        rest_pupil_center: ``(2,)`` the gaze every experiment holds fixed (the resting / mean eye position).
        video_shape: ``(H, W)`` of its videos; ``fps``: their frame rate.
        differentiable: whether gradients flow from the rates to the video (gradient RFs, MEIs).
    """

    mouse_id: str
    unit_ids: np.ndarray
    grey: float
    behavior_mean: np.ndarray
    behavior_std: np.ndarray
    rest_pupil_center: np.ndarray
    video_shape: tuple[int, int] = (twin.HEIGHT, twin.WIDTH)
    fps: float = FPS
    differentiable: bool = False
    device: torch.device = torch.device("cpu")

    @abstractmethod
    def __call__(self, video: Tensor, behavior: Tensor, pupil_center: Tensor) -> Tensor:
        """Rates ``(B, N, T)`` of raw ``video (B, 1, T, H, W)``, ``behavior (B, 2, T)``, ``pupil_center (B, 2, T)``."""

    def neuron_index(self, neurons: Sequence[int] | None) -> np.ndarray:
        """Output indices of the unit ids ``neurons`` (all when None); a clear error names any id not in the mouse."""
        if neurons is None:
            return np.arange(len(self.unit_ids))
        where = {int(u): i for i, u in enumerate(self.unit_ids)}
        missing = [int(n) for n in neurons if int(n) not in where]
        if missing:
            raise ValueError(
                f"neurons {missing}: not unit ids of mouse {self.mouse_id} "
                f"(it has {len(self.unit_ids)}, ids {int(self.unit_ids.min())}..{int(self.unit_ids.max())})"
            )
        return np.array([where[int(n)] for n in neurons], dtype=np.int64)


# ------------------------------------------------------------------------------------------------ ground truth
def _frames_from_steps(rate: np.ndarray, frames: int) -> np.ndarray:
    """``(N, S)`` 15 Hz rates → ``(N, frames)``: step s is known at frame 2s + 1 and held until the next one."""
    step = np.minimum(np.maximum(np.arange(frames) - 1, 0) // twin.FRAMES_PER_STEP, rate.shape[1] - 1)
    return rate[:, step]


class GroundTruth(Responder):
    """The generator of a synthetic mouse as a model: its noiseless firing rates, held at 30 Hz.

    Not differentiable (the generator is NumPy): experiments that need gradients run on trained models.
    """

    def __init__(
        self,
        params: twin.NeuronParameters,
        mouse_id: str = "synthetic",
        unit_ids: np.ndarray | None = None,
        behavior_mean: np.ndarray | None = None,
        behavior_std: np.ndarray | None = None,
    ) -> None:
        self.params = params
        self.mouse_id = mouse_id
        n = len(params.channel)
        self.unit_ids = np.arange(1, n + 1) if unit_ids is None else np.asarray(unit_ids)
        if len(self.unit_ids) != n:
            raise ValueError(f"unit_ids: {len(self.unit_ids)} ids for {n} ground-truth neurons")
        self.grey = twin.VIDEO_MEAN
        pupil_mean, pupil_std = (float(v) for v in params.pupil_reference)
        self.behavior_mean = np.array([pupil_mean, 0.0]) if behavior_mean is None else np.asarray(behavior_mean)
        self.behavior_std = np.array([pupil_std, 10.0]) if behavior_std is None else np.asarray(behavior_std)
        self.rest_pupil_center = np.asarray(params.eye_reference, dtype=np.float64)

    @classmethod
    def from_release(cls, release: str | Path, mouse_id: str) -> GroundTruth:
        """The generator of ``mouse_id`` in a synthetic ``release`` (written by ``synth``), with its behaviour stats."""
        params = load_neuron_parameters(release, mouse_id)
        session = Path(release) / mouse_id
        unit_ids = np.load(session / "meta" / "neurons" / "unit_ids.npy")
        stats = session / "meta" / "statistics" / "behavior" / "all"
        mean_t, std_t = (np.load(stats / f"{s}.npy").T for s in ("mean", "std"))  # (T_pad, 2) each
        mean, std = over_time(mean_t, std_t)
        return cls(params, mouse_id, unit_ids, mean[0].astype(np.float64), std[0].astype(np.float64))

    @torch.no_grad()
    def __call__(self, video: Tensor, behavior: Tensor, pupil_center: Tensor) -> Tensor:
        out = []
        for v, b, p in zip(video, behavior, pupil_center, strict=True):
            frames = v.shape[1]
            bank = twin.feature_bank(v[0].detach().cpu().numpy())  # v: (1, T, H, W)
            rate = twin.step_rates(bank, self.params, b.T.cpu().numpy(), p.T.cpu().numpy())  # (N, S)
            out.append(torch.from_numpy(_frames_from_steps(rate, frames).astype(np.float32)))
        return torch.stack(out)  # (B, N, T)


# ------------------------------------------------------------------------------------------------ trained models
class TrainedModel(Responder):
    """A checkpoint (or an ensemble) as a responder, inputs normalised like its data module's (``StimulusInputs``).

    Args:
        model: the :class:`~lightning_sensorium.ensemble.EnsembleModule` (or any module with
            ``predict_whole_trials``).
        inputs: the mouse's :class:`~lightning_sensorium.inference.StimulusInputs`.
        device: where to run the model.
        datamodule: the data module the model was loaded with (kept for callers that read its trials).
    """

    differentiable = True

    def __init__(self, model: Any, inputs: Any, device: str | torch.device = "cpu", datamodule: Any = None) -> None:
        self.datamodule = datamodule
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.inputs = inputs
        store = inputs.store
        self.mouse_id = store.mouse_id
        self.unit_ids = np.asarray(store.unit_ids)
        self.video_shape = (int(store.video_shape[0]), int(store.video_shape[1]))
        stats = store.statistics
        video_mean, video_std = over_time(stats["videos"]["mean"], stats["videos"]["std"])
        self.grey = float(np.nanmean(video_mean[0]))
        mean, std = over_time(stats["behavior"]["mean"], stats["behavior"]["std"])
        self.behavior_mean, self.behavior_std = mean[0].astype(np.float64), std[0].astype(np.float64)
        self.rest_pupil_center = np.asarray(inputs.mean_pupil, dtype=np.float64)

    def _transform(self, name: str, x: Tensor, frames: int, shape: tuple[int, ...]) -> Tensor:
        """``(x − shift) · gain`` with the mouse's per-frame statistics ``shift, gain`` broadcast to ``shape``."""
        if not self.inputs.per_frame:  # ``raw`` normalisation
            return x
        shift, gain = (
            torch.from_numpy(np.array(np.broadcast_to(self.inputs.statistic(f"{name}_{s}", frames), shape), np.float32))
            for s in ("shift", "gain")
        )  # writable copies
        return (x - shift.to(x)) * gain.to(x)

    def normalize(self, video: Tensor, behavior: Tensor, pupil_center: Tensor) -> dict[str, Any]:
        """The model batch of raw inputs (differentiable in ``video``)."""
        b, _, t, h, w = video.shape
        v = self._transform("video", video[:, 0], t, (t, h, w))[:, None]  # (B, 1, T, H, W)
        beh = self._transform("behavior", behavior.transpose(1, 2), t, (t, 2)).transpose(1, 2)  # (B, 2, T)
        pup = self._transform("pupil", pupil_center.transpose(1, 2), t, (t, 2)).transpose(1, 2)  # (B, 2, T)
        return {
            "mouse_id": self.mouse_id,
            "tier": "user",
            "video": v,
            "behavior": beh,
            "pupil_center": pup,
            "length": torch.full((b,), t, device=video.device),
            "trial": torch.arange(b, device=video.device),
        }

    def __call__(self, video: Tensor, behavior: Tensor, pupil_center: Tensor) -> Tensor:
        dev = self.device
        batch = self.normalize(video.to(dev).float(), behavior.to(dev).float(), pupil_center.to(dev).float())
        return self.model.predict_whole_trials(batch).float()


def load_trained(
    ckpt_paths: Sequence[str | Path],
    mouse: str | None = None,
    data: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> TrainedModel:
    """The checkpoint(s) ``ckpt_paths`` (several = their ensemble) as a responder for ``mouse``."""
    from lightning_sensorium.ensemble import load_ensemble
    from lightning_sensorium.inference import StimulusInputs

    model, dm = load_ensemble(ckpt_paths, data)
    if mouse is None:
        if len(dm.mouse_ids) != 1:
            raise ValueError(f"--mouse: choose the mouse whose neurons to study, one of {dm.mouse_ids}")
        mouse = dm.mouse_ids[0]
    if mouse not in dm.mouse_ids:
        raise ValueError(f"--mouse {mouse}: the checkpoint(s) do not know this mouse; they know {dm.mouse_ids}")
    inputs = StimulusInputs(dm.stores[mouse], normalizer=dm.normalizers[mouse])
    return TrainedModel(model, inputs, device, dm)
