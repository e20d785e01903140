"""SensoriumModule: the one LightningModule. Owns the loss, the metrics, the optimiser groups and all logging.

The network itself is an :class:`~lightning_sensorium.models.encoder.Encoder` (plain PyTorch) built from a core,
a readout factory and an optional shifter factory chosen in YAML, and the per-mouse neuron information that
LightningCLI links from the datamodule (``data.neurons`` → ``model.neurons``).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_sensorium.data.batch import NeuronInfo
from lightning_sensorium.data.layout import SKIP_FRAMES
from lightning_sensorium.losses import PoissonLoss
from lightning_sensorium.metrics import RepeatMetrics, SingleTrialCorrelation, pooled_mean
from lightning_sensorium.models.cores.base import Core
from lightning_sensorium.models.encoder import Encoder
from lightning_sensorium.models.readouts.base import Readout
from lightning_sensorium.models.readouts.gaussian import GaussianReadout

log = logging.getLogger(__name__)

ReadoutFactory = Callable[[tuple[int, int, int], NeuronInfo], Readout]
ShifterFactory = Callable[[], nn.Module]

#: Checkpoint key holding the neuron info, so a checkpoint loads without the data.
NEURONS_KEY = "sensorium_neurons"


def _default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=5e-3, weight_decay=0.01)


def _metric_key(tier: str, mouse_id: str) -> str:
    # nn.ModuleDict keys may not contain dots.
    return f"{tier}::{mouse_id}".replace(".", "_")


class SensoriumModule(L.LightningModule):
    """Trains and evaluates an Encoder on SENSORIUM batches.

    Args:
        core: the shared core (any :class:`Core` subclass, chosen with ``class_path``).
        readout: factory ``(in_shape, neurons) -> Readout`` called once per mouse.
        shifter: factory ``() -> nn.Module`` for a per-mouse pupil-centre shifter, or None.
        output_activation: the final nonlinearity (default ``ELU(x) + 1``, the baselines').
        loss: training loss (default: official Poisson sum × sqrt(n_trials / batch)).
        optimizer: optimizer factory applied to the parameter groups.
        scheduler: LR scheduler factory; a ``ReduceLROnPlateau`` monitors ``monitor``.
        scheduler_interval: ``epoch`` or ``step``.
        readout_lr: learning rate of readouts and shifters (default: the optimizer's).
        readout_weight_decay: weight decay of readouts and shifters (default: the optimizer's).
        accumulate_over_mice: one optimizer step per cycle of mice (the official LongCycler), via gradient
            accumulation over ``len(neurons)`` batches.
        monitor: validation metric used by the plateau scheduler and checkpointing.
        skip_frames: leading frames excluded from the metrics (official: 50).
        eval_window: predict whole trials by a sliding window of this many model frames (DwiseNeuro 16,
            Dynamic-V1FM 30); overlapping predictions are averaged. None: the whole trial in one pass (with a
            ``frame_step`` k > 1, one pass per phase: frames p, p + k, p + 2k, ... for p < k).
        eval_stride: raw frames between the ends of consecutive windows (DwiseNeuro 1, Dynamic-V1FM 15); the
            last window always ends at the trial's last frame.
        eval_window_batch: at most this many windows go through the model at once (memory bound).
        frame_step: the model sees every ``frame_step``-th frame — linked from ``data.frame_step``.
        teachers: checkpoints whose predictions become extra targets (DwiseNeuro's distillation stage): for every
            training sample, the mean teacher prediction of each *other* mouse's neurons is a target of the student's
            readout of that mouse. Needs ``data.batch_mode: mixed``.
        distill_ratio: share of the loss carried by the teacher targets (DwiseNeuro: 0.36).
        float32_readout: under autocast, readouts, shifters and output activation in float32 (see
            :class:`Encoder`); the core stays in low precision.
        log_figures: draw traces, correlation histograms and readout positions to TensorBoard.
        neurons: per-mouse neuron info — linked from the datamodule, or restored from the checkpoint.
        dataset_sizes: trials per mouse (the official loss scale) — linked from the datamodule.
        video_shape: frame height and width — linked from the datamodule.
    """

    def __init__(
        self,
        core: Core,
        readout: ReadoutFactory | None = None,
        shifter: ShifterFactory | None = None,
        output_activation: nn.Module | None = None,
        loss: nn.Module | None = None,
        optimizer: OptimizerCallable = _default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        readout_lr: float | None = None,
        readout_weight_decay: float | None = None,
        accumulate_over_mice: bool = True,
        monitor: str = "val/single_trial_corr",
        skip_frames: int = SKIP_FRAMES,
        eval_window: int | None = None,
        eval_stride: int = 1,
        eval_window_batch: int = 64,
        frame_step: int = 1,
        teachers: list[str] | None = None,
        distill_ratio: float = 0.36,
        float32_readout: bool = False,
        log_figures: bool = True,
        neurons: dict[str, NeuronInfo] | None = None,
        dataset_sizes: dict[str, int] | None = None,
        video_shape: tuple[int, int] = (36, 64),
    ) -> None:
        super().__init__()
        # Neuron arrays are large: kept out of hparams, saved in the checkpoint under NEURONS_KEY instead.
        self.save_hyperparameters(ignore=["neurons", "dataset_sizes"])
        self.readout_factory: ReadoutFactory = readout or GaussianReadout
        self.shifter_factory = shifter
        self.loss_fn = loss or PoissonLoss()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.readout_lr, self.readout_weight_decay = readout_lr, readout_weight_decay
        self.accumulate_over_mice = accumulate_over_mice
        self.monitor = monitor
        self.skip_frames = skip_frames
        if eval_window is not None and eval_window < 1:
            raise ValueError(f"model.eval_window must be ≥ 1 or null, got {eval_window}")
        if eval_stride < 1 or eval_window_batch < 1 or frame_step < 1:
            raise ValueError(
                f"model.eval_stride={eval_stride}, model.eval_window_batch={eval_window_batch} and "
                f"frame_step={frame_step} must be ≥ 1"
            )
        if frame_step > 1 and eval_window is not None and math.gcd(eval_stride, frame_step) != 1:
            raise ValueError(
                f"model.eval_stride={eval_stride} and data.frame_step={frame_step} share a factor: windows ending "
                f"every {eval_stride} frames would never predict some frames; use an eval_stride coprime to it"
            )
        self.eval_window, self.eval_stride, self.eval_window_batch = eval_window, eval_stride, eval_window_batch
        self.frame_step = frame_step
        if not 0.0 <= distill_ratio < 1.0:
            raise ValueError(f"model.distill_ratio must be in [0, 1), got {distill_ratio}")
        self.teacher_paths = list(teachers or [])
        self.distill_ratio = distill_ratio
        self._teachers: list[SensoriumModule] = []  # loaded in on_fit_start; a plain list: not submodules
        self.log_figures = log_figures
        self.dataset_sizes = dict(dataset_sizes or {})
        self.video_shape: tuple[int, int] = (int(video_shape[0]), int(video_shape[1]))
        self.output_activation = output_activation
        self.neurons: dict[str, NeuronInfo] = {}
        # The core is held by the encoder only; per-mouse parts are added once the neurons are known.
        self.encoder = Encoder(core, nn.ModuleDict(), None, output_activation, float32_readout)
        if neurons:
            self._build(neurons)
        self.metrics = nn.ModuleDict()
        self.results: dict[str, dict[str, Any]] = {}
        self._figure_batch: dict[str, Any] | None = None

    # ---------------------------------------------------------------------------------------------- building
    def _build(self, neurons: Mapping[str, NeuronInfo]) -> None:
        """Create the readouts (and shifters) of ``neurons`` around the existing core."""
        self.neurons = dict(neurons)
        built = Encoder.build(
            core=self.encoder.core,
            readout=self.readout_factory,
            neurons=self.neurons,
            shifter=self.shifter_factory,
            output_activation=self.encoder.output_activation,
            video_shape=self.video_shape,
            float32_readout=self.encoder.float32_readout,
        )
        self.encoder.readouts, self.encoder.shifters = built.readouts, built.shifters

    def _require_encoder(self) -> Encoder:
        if not self.neurons:
            raise RuntimeError(
                "SensoriumModule has no readouts: pass `neurons` (LightningCLI links data.neurons) or load a checkpoint"
            )
        return self.encoder

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Tensors, not numpy arrays: checkpoints must load with torch.load(weights_only=True).
        checkpoint[NEURONS_KEY] = {
            m: {
                "unit_ids": torch.as_tensor(np.asarray(n.unit_ids)),
                "coordinates": torch.as_tensor(np.asarray(n.coordinates)),
                "mean_responses": torch.as_tensor(np.asarray(n.mean_responses)),
            }
            for m, n in self.neurons.items()
        }
        checkpoint["sensorium_dataset_sizes"] = self.dataset_sizes

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = {
            m: NeuronInfo(mouse_id=m, **{k: torch.as_tensor(v).numpy() for k, v in d.items()})
            for m, d in checkpoint.get(NEURONS_KEY, {}).items()
        }
        if not self.neurons:
            self._build(saved)
            self.dataset_sizes = dict(checkpoint.get("sensorium_dataset_sizes", {}))
            return
        check_neurons_match(saved, self.neurons)

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, batch: Mapping[str, Any]) -> Tensor:
        """Predicted responses ``(B, N, T_out)`` aligned to the last ``T_out`` frames of ``batch['video']`` (before
        the ``response_scale`` that :meth:`predict_full` applies)."""
        encoder = self._require_encoder()
        return encoder(
            batch["video"], batch["mouse_id"], behavior=batch.get("behavior"), pupil_center=batch.get("pupil_center")
        )

    def predict_full(self, batch: Mapping[str, Any]) -> Tensor:
        """Predictions for every frame of the batch ``(B, N, T)``; frames without a prediction are NaN.

        The whole trial goes through the model in one pass, or, with ``eval_window``, window by window. Trials
        shorter than the batch (``length``; zero-padded by the loader) are predicted in groups of equal length,
        cut to it: a non-causal core (ViViT, DwiseNeuro, Swin) would otherwise see the padding, and the last
        sliding window must end at each trial's own last frame.

        A batch with a ``response_scale`` ``(B, N, T)`` (``data.response_scale``) has its predictions multiplied by
        it, frame by frame: the model predicts a scale that is constant in time, the official targets' scale is not."""
        scale = batch.get("response_scale")
        pred = self._predict_lengths(batch)  # (B, N, T)
        return pred if scale is None else pred * scale.to(pred.dtype)

    def _predict_lengths(self, batch: Mapping[str, Any]) -> Tensor:
        """:meth:`predict_full` before the response scale."""
        t = batch["video"].shape[2]
        if batch.get("length") is None:
            return self._predict_trials(batch)
        lengths = torch.as_tensor(batch["length"], device=batch["video"].device)
        if bool((lengths >= t).all()):
            return self._predict_trials(batch)
        out: Tensor | None = None
        for length in torch.unique(lengths).tolist():
            rows = (lengths == length).nonzero().squeeze(1)  # (B_g,) trials of this length
            pred = self._predict_trials(_model_inputs(batch, slice(length), rows))  # (B_g, N, L)
            if out is None:
                out = pred.new_full((len(lengths), pred.shape[1], t), float("nan"))
            out[rows, :, :length] = pred
        assert out is not None
        return out  # (B, N, T), NaN past each trial's length

    def _predict_trials(self, batch: Mapping[str, Any]) -> Tensor:
        """:meth:`predict_full` for trials that fill the batch's frames."""
        if self.eval_window is not None:
            return self._predict_sliding(batch)
        if self.frame_step > 1:
            return self._predict_phases(batch)
        pred = self(batch)  # (B, N, T_out)
        t = batch["video"].shape[2]
        lost = t - pred.shape[-1]
        if lost <= 0:
            return pred[..., -t:]
        return torch.nn.functional.pad(pred, (lost, 0), value=float("nan"))

    def _predict_phases(self, batch: Mapping[str, Any]) -> Tensor:
        """Whole trials at a ``frame_step`` k without a window: one pass over each phase's frames p, p + k, ...
        (a model trained on every k-th frame predicts each of them from the frames it saw in training, the last
        being its own); together the k passes cost one pass at the full frame rate."""
        video = batch["video"]
        b, _, t = video.shape[:3]
        out: Tensor | None = None
        for phase in range(min(self.frame_step, t)):
            sub = _model_inputs(batch, slice(phase, None, self.frame_step))  # (B, ..., T_p): the phase's frames
            pred = self(sub)  # (B, N, T_out) for the last T_out of the phase's T_p frames
            if out is None:
                out = pred.new_full((b, pred.shape[1], t), float("nan"))
            t_p = sub["video"].shape[2]
            kept = min(pred.shape[-1], t_p)
            frames = phase + self.frame_step * torch.arange(t_p - kept, t_p, device=video.device)  # raw frame of each
            out[..., frames] = pred[..., -kept:]
        assert out is not None
        return out  # (B, N, T)

    def _predict_sliding(self, batch: Mapping[str, Any]) -> Tensor:
        """Sliding-window prediction (DwiseNeuro's ``src/predictors.py``, Dynamic-V1FM's test-time tiling).

        A window takes ``eval_window`` frames, every ``frame_step``-th, and ends at raw frame ``e``; its outputs
        belong to its last ``T'`` sampled frames. Window ends run every ``eval_stride`` frames from the first
        complete window, plus windows that start at the first and end at the last frames of each of the
        ``frame_step`` phases (for ``frame_step`` 1: one ending at the last frame); each frame's prediction is the
        mean over the windows that predict it. https://github.com/lRomul/sensorium/blob/main/src/predictors.py
        """
        assert self.eval_window is not None
        video = batch["video"]
        b, _, t = video.shape[:3]
        span = (self.eval_window - 1) * self.frame_step + 1  # raw frames one window covers
        if t < span:
            raise ValueError(
                f"a trial of {t} frames is shorter than one prediction window of {span} frames "
                f"(model.eval_window={self.eval_window}, data.frame_step={self.frame_step})"
            )
        # Every eval_stride frames from the first complete window, plus, for each of the frame_step phases, one
        # window starting at the first frames and one ending at the last (a single last window at frame_step 2
        # would leave the other phase's last frames unpredicted whenever the stride skips them).
        k = self.frame_step
        ends = sorted(
            set(range(span - 1, t, self.eval_stride))
            | {e for e in range(span - 1, span - 1 + k) if e < t}
            | {e for e in range(t - k, t) if e >= span - 1}
        )
        offsets = torch.arange(self.eval_window, device=video.device) * self.frame_step - (span - 1)  # (L,)
        total: Tensor | None = None
        count = torch.zeros(t, device=video.device)
        per_pass = max(1, self.eval_window_batch // b)
        for i in range(0, len(ends), per_pass):
            chunk = torch.tensor(ends[i : i + per_pass], device=video.device)
            idx = chunk[:, None] + offsets[None, :]  # (W, L) raw frame of each window frame
            w, length = idx.shape
            windows: dict[str, Any] = {"mouse_id": batch["mouse_id"]}
            # (B, C, W, L, ...) → (B·W, C, L, ...): every window of every trial is one sample.
            clip = video[:, :, idx]  # (B, C, W, L, H, W_px)
            windows["video"] = clip.transpose(1, 2).reshape(b * w, clip.shape[1], length, *clip.shape[4:])
            for key in ("behavior", "pupil_center"):
                if batch.get(key) is not None:
                    sig = batch[key][:, :, idx]  # (B, 2, W, L)
                    windows[key] = sig.transpose(1, 2).reshape(b * w, sig.shape[1], length)  # (B·W, 2, L)
            pred = self(windows)  # (B·W, N, L')
            n, l_out = pred.shape[1], pred.shape[2]
            pred = pred.reshape(b, w, n, l_out).permute(0, 2, 1, 3).reshape(b, n, w * l_out)  # (B, N, W·L')
            frames = idx[:, -l_out:].reshape(-1)  # (W·L',) raw frame of each output
            if total is None:
                total = pred.new_zeros(b, n, t)
            total.index_add_(2, frames, pred)
            count.index_add_(0, frames, torch.ones_like(frames, dtype=count.dtype))
        assert total is not None
        out = total / count.clamp(min=1).to(total.dtype)
        return out.masked_fill(count == 0, float("nan"))  # (B, N, T)

    # ------------------------------------------------------------------------------------------------ training
    def setup(self, stage: str) -> None:
        """Under DDP with several mice, let DDP skip the parameters a batch does not use.

        A per-mouse batch (and a mixed batch that happens to miss a mouse) leaves the other mice's readouts and
        shifters without gradients, which plain DDP refuses at the next step ("Expected to have finished
        reduction"). Lightning builds the DDP wrapper after this hook, so ``find_unused_parameters`` is switched
        on here, once, instead of asking every user for ``strategy: ddp_find_unused_parameters_true``.
        """
        from lightning.pytorch.strategies import DDPStrategy

        strategy = self.trainer.strategy
        if stage == "fit" and isinstance(strategy, DDPStrategy) and len(self.neurons) > 1:
            kwargs = strategy._ddp_kwargs  # the keyword arguments DDPStrategy passes to DistributedDataParallel
            if not kwargs.get("find_unused_parameters") and not kwargs.get("static_graph"):
                kwargs["find_unused_parameters"] = True
                log.info(
                    "DDP with %d mice: find_unused_parameters=True (each batch uses some readouts only)",
                    len(self.neurons),
                )

    @property
    def _batches_per_mouse_cycle(self) -> int:
        """Batches accumulated into one optimizer step by ``accumulate_over_mice`` (1 when it is off)."""
        return len(self.neurons) if self.accumulate_over_mice and len(self.neurons) > 1 else 1

    def on_fit_start(self) -> None:
        if self._batches_per_mouse_cycle > 1:
            # LongCycler: one batch per mouse, one optimizer step per cycle.
            self.trainer.accumulate_grad_batches = self._batches_per_mouse_cycle
        if self.teacher_paths and not self._teachers:
            self._teachers = [self._load_teacher(path) for path in self.teacher_paths]

    def _load_teacher(self, path: str) -> SensoriumModule:
        """A frozen teacher in eval mode on this module's device; its mice and neurons must be this model's."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"model.teachers: no checkpoint {path!r}")
        teacher = SensoriumModule.load_from_checkpoint(path, map_location=self.device)
        try:
            check_neurons_match(teacher.neurons, self.neurons)
        except ValueError as err:
            raise ValueError(f"model.teachers: {path}: {err}") from err
        teacher.eval().requires_grad_(False)
        return teacher

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        mouse = batch["mouse_id"]
        if not isinstance(mouse, str):
            return self._mixed_training_step(batch)
        pred = self(batch)  # (B, N, T_out)
        target = _unscaled(batch["responses"], batch.get("response_scale"))[..., -pred.shape[-1] :]  # (B, N, T_out)
        loss = self.loss_fn(pred, target, None, self.dataset_sizes.get(mouse, pred.shape[0]))
        reg = self._require_encoder().regularizer(mouse)
        total = loss + reg
        bs = pred.shape[0]
        self.log("train/loss", loss, batch_size=bs, prog_bar=True)
        self.log("train/regularizer", reg, batch_size=bs)
        return total

    def _mixed_training_step(self, batch: dict[str, Any]) -> Tensor:
        """Mice mixed inside a batch (DwiseNeuro): one core pass over the whole batch, then each mouse's samples
        through its readout; every loss term is reduced over the whole batch (``batch_size=B``), so a
        ``sample_mean`` loss is the mean over all samples of per-sample sums, as the original's."""
        encoder = self._require_encoder()
        mice: list[str] = batch["mouse_id"]
        behavior, pupil = batch.get("behavior"), batch.get("pupil_center")
        features = encoder.core(batch["video"], behavior, pupil)  # (B, C', T', H', W')
        t_out = features.shape[2]

        def read(model: Encoder, feats: Tensor, idx: list[int], mouse: str) -> Tensor:
            sub = [None if x is None else x[idx] for x in (behavior, pupil)]
            return model.read(feats[idx], mouse, sub[0], sub[1])  # (b, N_mouse, T')

        scales = batch.get("response_scale")  # B × (N_mouse, T) or None
        responses = [
            _unscaled(r, None if scales is None else scales[i]) for i, r in enumerate(batch["responses"])
        ]  # B × (N_mouse, T)

        loss = torch.zeros((), device=self.device)
        reg = encoder.core.regularizer()
        for mouse in sorted(set(mice)):
            idx = [i for i, m in enumerate(mice) if m == mouse]
            target = torch.stack([responses[i] for i in idx])[..., -t_out:]  # (b, N, T')
            size = self.dataset_sizes.get(mouse, len(idx))
            loss = loss + self.loss_fn(read(encoder, features, idx, mouse), target, None, size, batch_size=len(mice))
            reg = reg + encoder.readouts[mouse].regularizer()
        if self._teachers:
            loss = (1 - self.distill_ratio) * loss + self.distill_ratio * self._distillation_loss(batch, features, read)
        self.log("train/loss", loss, batch_size=len(mice), prog_bar=True)
        self.log("train/regularizer", reg, batch_size=len(mice))
        return loss + reg

    def _distillation_loss(self, batch: dict[str, Any], features: Tensor, read: Callable[..., Tensor]) -> Tensor:
        """Mean over (sample, other mouse) pairs of the loss against the teachers' mean prediction.

        DwiseNeuro's stage 2 weights these pairs so they carry ``distill_ratio`` of the loss:
        https://github.com/lRomul/sensorium/blob/main/src/argus_models.py (``add_distill_predictions``)."""
        encoder = self._require_encoder()
        mice: list[str] = batch["mouse_id"]
        behavior, pupil = batch.get("behavior"), batch.get("pupil_center")
        with torch.no_grad():
            teacher_features = [t.encoder.core(batch["video"], behavior, pupil) for t in self._teachers]
        pairs = sum(sum(m != other for m in mice) for other in self.neurons)
        loss = torch.zeros((), device=self.device)
        for other in sorted(self.neurons):
            idx = [i for i, m in enumerate(mice) if m != other]
            if not idx:
                continue
            with torch.no_grad():
                preds = [read(t.encoder, f, idx, other) for t, f in zip(self._teachers, teacher_features, strict=True)]
                target = torch.stack(preds).mean(0)  # (b, N_other, T'): the teachers' mean firing rate
            pred = read(encoder, features, idx, other)
            size = self.dataset_sizes.get(other, len(idx))
            loss = loss + self.loss_fn(pred, target, None, size, batch_size=pairs)
        return loss

    # ---------------------------------------------------------------------------------------------- evaluation
    def _setup_metrics(self, stage: str) -> None:
        """Create every (tier, mouse) metric up front so all DDP ranks hold the same set."""
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "clip_counts"):
            return
        tiers = {"val": dm.val_tiers, "test": dm.test_tiers}[stage]
        for tier, per_mouse in dm.clip_counts(tiers).items():
            for mouse, clips in per_mouse.items():
                if clips == 0 or mouse not in self.neurons:
                    continue
                n = self.neurons[mouse].num_neurons
                group = nn.ModuleDict(
                    {
                        "single": SingleTrialCorrelation(n, skip_frames=self.skip_frames),
                        "repeat": RepeatMetrics(n, num_clips=clips, skip_frames=self.skip_frames),
                        "ground_truth": SingleTrialCorrelation(n, skip_frames=self.skip_frames),
                    }
                )
                self.metrics[f"{stage}::{_metric_key(tier, mouse)}"] = group.to(self.device)

    def on_validation_epoch_start(self) -> None:
        if not any(k.startswith("val::") for k in self.metrics):
            self._setup_metrics("val")

    def on_test_epoch_start(self) -> None:
        if not any(k.startswith("test::") for k in self.metrics):
            self._setup_metrics("test")

    def _eval_step(self, stage: str, batch: dict[str, Any]) -> None:
        if batch.get("padding"):  # a DDP rank's stand-in batch (datamodule._PaddedEvalSampler): not scored
            return
        mouse, tier = batch["mouse_id"], batch["tier"]
        key = f"{stage}::{_metric_key(tier, mouse)}"
        if key not in self.metrics:
            return
        pred = self.predict_full(batch)  # (B, N, T)
        lost = int(torch.isnan(pred[0, 0]).sum())
        if lost > self.skip_frames:
            raise ValueError(f"the core loses {lost} leading frames, more than the {self.skip_frames} skipped frames")
        pred = torch.nan_to_num(pred, nan=0.0)
        group = self.metrics[key]
        target, lengths = batch["responses"], batch["length"]
        group["single"].update(pred, target, lengths)
        group["repeat"].update(pred, target, batch["clip_index"], lengths)
        if "rates" in batch:
            group["ground_truth"].update(batch["rates"], target, lengths)
        if stage == "val" and self._figure_batch is None:
            self._figure_batch = {"mouse_id": mouse, "pred": pred[:1].cpu(), "target": target[:1].cpu()}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _compute(self, stage: str) -> dict[str, Any]:
        """Compute (a collective under DDP: every rank calls it) and reset the stage's metrics."""
        per_tier: dict[str, dict[str, dict[str, Tensor]]] = {}
        for key, group in self.metrics.items():
            st, tier, mouse = key.split("::")
            if st != stage:
                continue
            with warnings.catch_warnings():
                # Under DDP every rank computes every metric (a collective), updated locally or not.
                warnings.filterwarnings("ignore", message=".*compute.*before the ``update``.*")
                values: dict[str, Tensor] = {"single_trial_corr": group["single"].compute()}
                values.update(group["repeat"].compute())
                gt_corr = group["ground_truth"].compute()
            if bool(group["ground_truth"].n > 0):
                values["ground_truth_corr"] = gt_corr
            for metric in group.values():
                metric.reset()
            per_tier.setdefault(tier, {})[mouse] = values
        return summarise(per_tier)

    def _log_results(self, stage: str, results: dict[str, Any], primary_tier: str) -> None:
        for tier, res in results.items():
            prefix = f"{stage}/{tier}"
            for name, value in res["pooled"].items():
                self.log(f"{prefix}/{name}", value, sync_dist=False)
                if tier == primary_tier:
                    self.log(f"{stage}/{name}", value, prog_bar=name == "single_trial_corr", sync_dist=False)
            for mouse, vals in res["per_mouse"].items():
                for name, value in vals.items():
                    if tier == primary_tier:
                        self.log(f"{stage}/{name}/{mouse}", value, sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        results = self._compute("val")
        self.results["val"] = results
        if not results:
            return
        self._log_results("val", results, self.trainer.datamodule.val_tiers[0])
        if self.log_figures and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self._draw_figures(results)
        self._figure_batch = None

    def on_test_epoch_end(self) -> None:
        results = self._compute("test")
        self.results["test"] = results
        if results:
            self._log_results("test", results, self.trainer.datamodule.test_tiers[0])

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any] | None:
        if batch.get("padding"):  # a DDP rank's stand-in batch: nothing to write
            return None
        pred = self.predict_full(batch)
        return {
            "mouse_id": batch["mouse_id"],
            "tier": batch["tier"],
            "trial": batch["trial"],
            "length": batch["length"],
            "prediction": pred,
        }

    # ------------------------------------------------------------------------------------------------- logging
    def on_train_start(self) -> None:
        if self.logger is not None:
            # Fill the TensorBoard hparams tab's metric columns (ecosystem.md §6).
            self.logger.log_hyperparams(dict(self.hparams), {self.monitor: float("nan"), "best/val_corr": float("nan")})

    def _draw_figures(self, results: dict[str, Any]) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        from lightning_sensorium.figures import correlation_histogram, readout_positions, traces

        loggers = [lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        writer, step = loggers[0].experiment, self.global_step
        tier = self.trainer.datamodule.val_tiers[0]
        per_neuron = {m: v["single_trial_corr_per_neuron"] for m, v in results[tier]["per_mouse_vectors"].items()}
        writer.add_figure("val/correlation_histogram", correlation_histogram(per_neuron), step)
        if self._figure_batch is not None:
            fb = self._figure_batch
            corr = per_neuron[fb["mouse_id"]]
            writer.add_figure("val/traces", traces(fb["pred"][0], fb["target"][0], corr, self.skip_frames), step)
        readouts = self._require_encoder().readouts
        positions = {m: r.positions().detach().cpu().numpy() for m, r in readouts.items() if hasattr(r, "positions")}
        if positions:
            writer.add_figure("val/readout_positions", readout_positions(positions), step)

    # -------------------------------------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> Any:
        groups = self._require_encoder().parameter_groups()
        param_groups: list[dict[str, Any]] = [{"params": groups["core"], "name": "core"}]
        readout_group: dict[str, Any] = {"params": groups["readout"], "name": "readout"}
        if self.readout_lr is not None:
            readout_group["lr"] = self.readout_lr
        if self.readout_weight_decay is not None:
            readout_group["weight_decay"] = self.readout_weight_decay
        param_groups.append(readout_group)
        optimizer = self.optimizer_factory(param_groups)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if hasattr(scheduler, "steps_per_epoch") and scheduler.steps_per_epoch is None:
            scheduler.steps_per_epoch = self._optimizer_steps_per_epoch()
        config: dict[str, Any] = {"scheduler": scheduler, "interval": self.scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = self.monitor
        return {"optimizer": optimizer, "lr_scheduler": config}

    def _optimizer_steps_per_epoch(self) -> int:
        """Optimizer steps in one training epoch: the loader's batches over the gradient accumulation (per cycle
        over the mice with ``accumulate_over_mice``, else the trainer's ``accumulate_grad_batches``)."""
        trainer = self.trainer
        if not math.isfinite(trainer.num_training_batches):
            trainer.fit_loop.setup_data()  # builds the training loader now (idempotent), hence num_training_batches
        batches = trainer.num_training_batches
        if not math.isfinite(batches) or batches < 1:
            raise ValueError(
                f"the scheduler needs steps_per_epoch, and the training loader has {batches} batches per epoch: "
                "set it in the scheduler's init_args"
            )
        accumulate = max(self._batches_per_mouse_cycle, trainer.accumulate_grad_batches)
        return max(1, math.ceil(int(batches) / accumulate))


def _model_inputs(batch: Mapping[str, Any], frames: slice, rows: Tensor | None = None) -> dict[str, Any]:
    """The model's inputs of ``batch`` (video ``(B, C, T, H, W)``, behaviour and pupil centre ``(B, 2, T)``: time is
    dimension 2 of each) at ``frames``, for the trials ``rows`` (default: all)."""
    sub: dict[str, Any] = {"mouse_id": batch["mouse_id"]}
    for key in ("video", "behavior", "pupil_center"):
        if batch.get(key) is not None:
            x = batch[key] if rows is None else batch[key][rows]
            sub[key] = x[:, :, frames]
    return sub


def _unscaled(responses: Tensor, scale: Tensor | None) -> Tensor:
    """Official-scale ``responses (..., N, T)`` divided by their ``response_scale`` (same shape; > 0 everywhere):
    each neuron's responses on one scale for all frames, ``raw × mean precision`` (``data.response_scale``)."""
    return responses if scale is None else responses / scale.to(responses.dtype)


def check_neurons_match(saved: Mapping[str, NeuronInfo], current: Mapping[str, NeuronInfo]) -> None:
    """Raise if a checkpoint's neurons differ from the data's (different mice, counts or unit ids)."""
    if set(saved) != set(current):
        raise ValueError(
            f"checkpoint mice {sorted(saved)} do not match the data's mice {sorted(current)}; "
            "select the same mice with --data.mice"
        )
    for m in saved:
        a, b = np.asarray(saved[m].unit_ids), np.asarray(current[m].unit_ids)
        if a.shape != b.shape or not np.array_equal(a, b):
            raise ValueError(
                f"mouse {m}: checkpoint has {a.shape[0]} neurons, the data has {b.shape[0]} (or different unit_ids)"
            )


def summarise(per_tier: Mapping[str, Mapping[str, Mapping[str, Tensor]]]) -> dict[str, Any]:
    """Per-neuron metric vectors → pooled (official neuron-weighted) and per-mouse means, per tier."""
    out: dict[str, Any] = {}
    for tier, per_mouse in per_tier.items():
        res: dict[str, Any] = {"per_mouse": {}, "pooled": {}, "per_mouse_vectors": {}}
        names = sorted({n for v in per_mouse.values() for n, t in v.items() if t.dim() == 1 and n != "fev_mask"})
        for name in names:
            vecs = {m: v[name].float() for m, v in per_mouse.items() if name in v}
            if name == "feve":
                # FEVE averages only neurons with FEV ≥ 0.15 (the 2022 definition).
                vecs = {m: v[name][per_mouse[m]["fev_mask"].bool()].float() for m, v in per_mouse.items()}
            res["pooled"][name] = float(pooled_mean(vecs)) if any(v.numel() for v in vecs.values()) else math.nan
            for m, vec in vecs.items():
                res["per_mouse"].setdefault(m, {})[name] = float(vec.mean()) if vec.numel() else math.nan
        for m, values in per_mouse.items():
            res["per_mouse_vectors"][m] = {"single_trial_corr_per_neuron": values["single_trial_corr"].cpu().numpy()}
        if "ground_truth_corr" in res["pooled"] and res["pooled"]["ground_truth_corr"] > 0:
            res["pooled"]["fraction_of_ground_truth"] = (
                res["pooled"]["single_trial_corr"] / res["pooled"]["ground_truth_corr"]
            )
        out[tier] = res
    return out
