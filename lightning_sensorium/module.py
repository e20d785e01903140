"""SensoriumModule: the one LightningModule. The training and evaluation steps, the loss, the metrics, the
optimiser groups and the logging.

The network itself is an :class:`~lightning_sensorium.models.encoder.Encoder` (plain PyTorch) built from a core,
a readout factory and an optional shifter factory chosen in YAML, and the per-mouse neuron information that
LightningCLI links from the datamodule (``data.neurons`` → ``model.neurons``). Whole trials are predicted by
:class:`~lightning_sensorium.predictors.WholeTrialPredictor`; figures are drawn by
:class:`~lightning_sensorium.callbacks.figures.FigureLogger`.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_sensorium.callbacks.figures import FigureLogger
from lightning_sensorium.data.batch import NeuronInfo, check_same_neurons
from lightning_sensorium.data.layout import SKIP_FRAMES
from lightning_sensorium.losses import PoissonLoss, poisson_nll
from lightning_sensorium.metrics import MetricGroup, summarise
from lightning_sensorium.models.cores.base import Core
from lightning_sensorium.models.encoder import Encoder, ReadoutFactory, ShifterFactory
from lightning_sensorium.models.readouts.gaussian import GaussianReadout
from lightning_sensorium.predictors import WholeTrialPredictor, check_inference_policy, prediction_record

log = logging.getLogger(__name__)

#: Checkpoint key holding the neuron info, so a checkpoint loads without the data.
NEURONS_KEY = "sensorium_neurons"


class PretrainedError(ValueError):
    """``model.pretrained`` cannot seed this model (raised before training; the CLI prints it as one line)."""


def _default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=5e-3, weight_decay=0.01)


def _metric_key(stage: str, tier: str, mouse_id: str) -> str:
    """``stage::tier::mouse`` (nn.ModuleDict keys may not contain dots)."""
    return f"{stage}::{tier}::{mouse_id}".replace(".", "_")


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
        eval_window: predict whole trials by a sliding window of this many model frames; None: in one pass (one per
            frame phase with a ``frame_step`` > 1). See :class:`~lightning_sensorium.predictors.WholeTrialPredictor`.
        eval_stride: raw frames between the ends of consecutive windows; the last window ends at the last frame.
        eval_window_batch: at most this many windows go through the model at once (memory bound).
        eval_tile_from: tile the windows instead of averaging them: each frame from this one on predicted by exactly
            one window keeping its last ``eval_stride`` outputs (Dynamic-V1FM's submission: 50); None: averaged.
        frame_step: the model sees every ``frame_step``-th frame — linked from ``data.frame_step``.
        teachers: checkpoints whose predictions become extra targets (DwiseNeuro's distillation stage): for every
            training sample, the mean teacher prediction of each *other* mouse's neurons is a target of the student's
            readout of that mouse. Needs ``data.batch_mode: mixed``.
        distill_ratio: share of the loss carried by the teacher targets (DwiseNeuro: 0.36).
        float32_readout: under autocast, readouts, shifters and output activation in float32 (see
            :class:`Encoder`); the core stays in low precision.
        pretrained: a checkpoint of this project whose core seeds this model (transfer to new mice, docs/training.md
            "Transfer to new mice"): loaded when a fit starts, after the configuration is checked against it (core
            shapes, frame size, frame step, input normalisation); a resumed fit restores its own weights instead.
        pretrained_readouts: mice the checkpoint also knows (same unit ids) ``keep`` its readout and shifter, or
            ``reinit`` them; mice it does not know always get fresh ones.
        pretrained_shifter: the shifter of a mouse without one in the checkpoint: ``fresh``, or ``mean``: the
            parameter mean of the checkpoint's shifters (a shared gaze-to-shift map as the starting point).
        freeze_core: keep the core's weights and buffers fixed (no gradients, BatchNorm and dropout in eval mode):
            only readouts and shifters train. Needs ``pretrained`` or a core trained otherwise.
        core_lr: learning rate of the core's parameter group (fine-tuning a pretrained core gently); default: the
            optimizer's.
        compile_core: compile the core's forward with ``torch.compile`` (in place: ``nn.Module.compile``, so the
            checkpoint's keys do not change). The first batches of each shape pay the compilation; outputs equal
            the eager core's within float tolerance (BENCHMARKS.md, "torch.compile of every core").
        log_figures: add a :class:`~lightning_sensorium.callbacks.figures.FigureLogger` (traces, correlation
            histograms and readout positions in TensorBoard).
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
        eval_tile_from: int | None = None,
        frame_step: int = 1,
        teachers: list[str] | None = None,
        distill_ratio: float = 0.36,
        float32_readout: bool = False,
        pretrained: str | None = None,
        pretrained_readouts: Literal["keep", "reinit"] = "keep",
        pretrained_shifter: Literal["fresh", "mean"] = "fresh",
        freeze_core: bool = False,
        core_lr: float | None = None,
        compile_core: bool = False,
        log_figures: bool = True,
        neurons: dict[str, NeuronInfo] | None = None,
        dataset_sizes: dict[str, int] | None = None,
        video_shape: tuple[int, int] = (36, 64),
    ) -> None:
        super().__init__()
        # Neuron arrays are large: kept out of hparams, saved in the checkpoint under NEURONS_KEY instead. Under
        # LightningCLI the hparams are the configuration (class paths), which rebuilds the module from a checkpoint;
        # built in code (or rebuilt by load_from_checkpoint) they are the values, and the nn.Module ones (core,
        # loss, output activation) are left out, as Lightning recommends: the state dict holds them.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*is an instance of `nn.Module`.*")
            self.save_hyperparameters(ignore=["neurons", "dataset_sizes"])
        modules = [name for name, value in self.hparams.items() if isinstance(value, nn.Module)]
        if modules:
            self.save_hyperparameters(ignore=["neurons", "dataset_sizes", *modules])
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
        check_inference_policy(eval_window, eval_stride, eval_window_batch, frame_step, eval_tile_from)
        self.eval_window, self.eval_stride, self.eval_window_batch = eval_window, eval_stride, eval_window_batch
        self.eval_tile_from = eval_tile_from
        self.frame_step = frame_step
        if not 0.0 <= distill_ratio < 1.0:
            raise ValueError(f"model.distill_ratio must be in [0, 1), got {distill_ratio}")
        self.teacher_paths = list(teachers or [])
        self.distill_ratio = distill_ratio
        self._teachers: list[SensoriumModule] = []  # loaded in on_fit_start; a plain list: not submodules
        if pretrained_readouts not in ("keep", "reinit"):
            raise ValueError(f"model.pretrained_readouts={pretrained_readouts!r}: expected 'keep' or 'reinit'")
        if pretrained_shifter not in ("fresh", "mean"):
            raise ValueError(f"model.pretrained_shifter={pretrained_shifter!r}: expected 'fresh' or 'mean'")
        if core_lr is not None and freeze_core:
            raise ValueError("model.core_lr and model.freeze_core=true: a frozen core has no learning rate")
        self.pretrained = pretrained
        self.pretrained_readouts, self.pretrained_shifter = pretrained_readouts, pretrained_shifter
        self.freeze_core, self.core_lr = freeze_core, core_lr
        self.log_figures = log_figures
        self.dataset_sizes = dict(dataset_sizes or {})
        self.video_shape: tuple[int, int] = (int(video_shape[0]), int(video_shape[1]))
        self.output_activation = output_activation
        self.neurons: dict[str, NeuronInfo] = {}
        # The core is held by the encoder only; per-mouse parts are added once the neurons are known.
        self.encoder = Encoder(core, nn.ModuleDict(), None, output_activation, float32_readout)
        if freeze_core:
            core.requires_grad_(False)
        if compile_core:
            core.compile()  # the forward only; parameters and state_dict keys stay the core's own
        if neurons:
            self._build(neurons)
        self.metrics = nn.ModuleDict()  # "stage::tier::mouse" → MetricGroup
        self.results: dict[str, dict[str, Any]] = {}  # stage → summarise() of its last evaluation

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
        saved = _saved_neurons(checkpoint)
        if not self.neurons:
            self._build(saved)
            self.dataset_sizes = dict(checkpoint.get("sensorium_dataset_sizes", {}))
            return
        check_same_neurons(saved, self.neurons)

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, batch: Mapping[str, Any]) -> Tensor:
        """Predicted responses ``(B, N, T')`` aligned to the last ``T'`` frames of ``batch['video']`` (before the
        ``response_scale`` that :meth:`predict_whole_trials` applies)."""
        encoder = self._require_encoder()
        return encoder(
            batch["video"], batch["mouse_id"], behavior=batch.get("behavior"), pupil_center=batch.get("pupil_center")
        )

    @property
    def whole_trial_predictor(self) -> WholeTrialPredictor:
        """This module's inference policy (``eval_window``, ``eval_stride``, ``frame_step``, ...) on :meth:`forward`."""
        return WholeTrialPredictor(
            self, self.eval_window, self.eval_stride, self.eval_window_batch, self.frame_step, self.eval_tile_from
        )

    def predict_whole_trials(self, batch: Mapping[str, Any]) -> Tensor:
        """Predictions for every frame of the batch's whole trials ``(B, N, T)``; frames without one are NaN."""
        return self.whole_trial_predictor(batch)

    # ------------------------------------------------------------------------------------------------ training
    def train(self, mode: bool = True) -> SensoriumModule:
        """As ``nn.Module.train``; a frozen core stays in eval mode (its BatchNorm statistics and dropout fixed)."""
        super().train(mode)
        if self.freeze_core:
            self.encoder.core.eval()
        return self

    def setup(self, stage: str) -> None:
        """Load ``pretrained`` (before Lightning restores a resumed fit's own weights) and, under DDP with several
        mice, let DDP skip the parameters a batch does not use.

        A per-mouse batch (and a mixed batch that happens to miss a mouse) leaves the other mice's readouts and
        shifters without gradients, which plain DDP refuses at the next step ("Expected to have finished
        reduction"). Lightning builds the DDP wrapper after this hook, so ``find_unused_parameters`` is switched
        on here, once, instead of asking every user for ``strategy: ddp_find_unused_parameters_true``.
        """
        if stage == "fit" and self.pretrained is not None:
            datamodule = getattr(self.trainer, "datamodule", None)
            self.load_pretrained(self.pretrained, dict(getattr(datamodule, "hparams", {}) or {}))
        if stage == "fit" and self.freeze_core:
            self.encoder.core.eval()  # Lightning keeps the modes it is given (and restores them after validation)
            # ... and warns about them: here they are the point.
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
        self._ddp_unused_parameters(stage)

    def _ddp_unused_parameters(self, stage: str) -> None:
        """Under DDP with several mice, switch ``find_unused_parameters`` on (see :meth:`setup`)."""
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
            check_same_neurons(teacher.neurons, self.neurons, names=("the teacher", "this model"))
        except ValueError as err:
            raise ValueError(f"model.teachers: {path}: {err}") from err
        teacher.eval().requires_grad_(False)
        return teacher

    # --------------------------------------------------------------------------------------------- transfer
    def load_pretrained(self, path: str, data_hparams: Mapping[str, Any] | None = None) -> None:
        """Seed this model from checkpoint ``path`` (``model.pretrained``): its core, and the per-mouse parts as
        ``pretrained_readouts`` and ``pretrained_shifter`` say. Everything is checked before any weight changes;
        a mismatch is a ``ValueError`` naming the option and what differs. ``data_hparams``: this fit's data
        settings, compared with the checkpoint's where they change what the core sees."""
        ckpt = _read_checkpoint(path, "model.pretrained")
        state: dict[str, Tensor] = ckpt["state_dict"]
        encoder = self._require_encoder()
        _check_same_inputs(path, ckpt, self, dict(data_hparams or {}))
        core_state = {k.removeprefix("encoder.core."): v for k, v in state.items() if k.startswith("encoder.core.")}
        _check_same_shapes(path, "core", core_state, encoder.core.state_dict())
        saved = _saved_neurons(ckpt)
        keep = [m for m in self.neurons if m in saved] if self.pretrained_readouts == "keep" else []
        try:
            check_same_neurons(
                {m: saved[m] for m in keep}, self.neurons, names=(f"model.pretrained {path}", "the data"), mice="shared"
            )
        except ValueError as err:
            raise PretrainedError(
                f"{err}; set model.pretrained_readouts=reinit to give those mice fresh readouts"
            ) from err
        parts: dict[str, dict[str, Tensor]] = {}  # "readouts.<mouse>" / "shifters.<mouse>" → its state
        for mouse in keep:
            for kind in ("readouts", "shifters"):
                prefix = f"encoder.{kind}.{mouse}."
                part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
                module = getattr(encoder, kind)
                if part and module is not None:
                    _check_same_shapes(path, f"{kind[:-1]} of mouse {mouse}", part, module[mouse].state_dict())
                    parts[f"{kind}.{mouse}"] = part
        if self.pretrained_shifter == "mean" and encoder.shifters is not None:
            mean = _mean_shifter(path, state)
            for mouse in self.neurons:
                if f"shifters.{mouse}" not in parts:
                    _check_same_shapes(path, "shifter", mean, encoder.shifters[mouse].state_dict())
                    parts[f"shifters.{mouse}"] = mean
        encoder.core.load_state_dict(core_state)
        for name, part in parts.items():
            kind, mouse = name.split(".", 1)
            getattr(encoder, kind)[mouse].load_state_dict(part)
        log.info(
            "model.pretrained %s: core loaded (%s); readouts kept for %s, fresh for %s",
            path,
            "frozen" if self.freeze_core else "trained" + (f" at lr {self.core_lr}" if self.core_lr else ""),
            keep or "no mouse",
            [m for m in self.neurons if m not in keep] or "no mouse",
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        mouse = batch["mouse_id"]
        if not isinstance(mouse, str):
            return self._mixed_training_step(batch)
        pred = self(batch)  # (B, N, T_out)
        target = _unscaled(batch["responses"], batch.get("response_scale"))[..., -pred.shape[-1] :]  # (B, N, T_out)
        loss = self.loss_fn(pred, target, None, self.dataset_sizes.get(mouse, pred.shape[0]))
        reg = self._require_encoder().regularizer(mouse)
        nll = poisson_nll(pred.detach().float(), target.float())  # (B, N, T_out)
        self._log_loss(loss, reg, batch_size=pred.shape[0], nll_sum=nll.sum(), values=nll.numel())
        return loss + reg

    def _log_loss(self, loss: Tensor, regularizer: Tensor, batch_size: int, nll_sum: Tensor, values: int) -> None:
        """``train/loss``: the loss the optimiser minimises, in the recipe's own reduction (the baselines' Poisson sum
        × √(trials/B) is in the hundreds of thousands); ``train/poisson_nll``, the one on the progress bar: the mean
        Poisson negative log-likelihood of one response (``values`` of them, summing to ``nll_sum``), the same unit
        for every recipe, batch size and window."""
        self.log("train/loss", loss, batch_size=batch_size)
        self.log("train/poisson_nll", nll_sum / values, batch_size=batch_size, prog_bar=True)
        self.log("train/regularizer", regularizer, batch_size=batch_size)

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
        nll_sum, values = torch.zeros((), device=self.device), 0
        for mouse in sorted(set(mice)):
            idx = [i for i, m in enumerate(mice) if m == mouse]
            target = torch.stack([responses[i] for i in idx])[..., -t_out:]  # (b, N, T')
            size = self.dataset_sizes.get(mouse, len(idx))
            pred = read(encoder, features, idx, mouse)  # (b, N, T')
            loss = loss + self.loss_fn(pred, target, None, size, batch_size=len(mice))
            reg = reg + encoder.readouts[mouse].regularizer()
            nll_sum = nll_sum + poisson_nll(pred.detach().float(), target.float()).sum()
            values += target.numel()
        if self._teachers:
            loss = (1 - self.distill_ratio) * loss + self.distill_ratio * self._distillation_loss(batch, features, read)
        self._log_loss(loss, reg, batch_size=len(mice), nll_sum=nll_sum, values=values)
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
        """Create every (tier, mouse) metric group up front so all DDP ranks hold the same set."""
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "clip_counts"):
            return
        tiers = {"val": dm.val_tiers, "test": dm.test_tiers}[stage]
        for tier, per_mouse in dm.clip_counts(tiers).items():
            for mouse, clips in per_mouse.items():
                if clips == 0 or mouse not in self.neurons:
                    continue
                group = MetricGroup(self.neurons[mouse].num_neurons, num_clips=clips, skip_frames=self.skip_frames)
                self.metrics[_metric_key(stage, tier, mouse)] = group.to(self.device)

    def on_validation_epoch_start(self) -> None:
        if not any(k.startswith("val::") for k in self.metrics):
            self._setup_metrics("val")

    def on_test_epoch_start(self) -> None:
        if not any(k.startswith("test::") for k in self.metrics):
            self._setup_metrics("test")

    def _eval_step(self, stage: str, batch: dict[str, Any]) -> Tensor | None:
        """Score a batch of whole trials; returns its predictions ``(B, N, T)`` (for callbacks), None if unscored.

        On the competition's scale whatever the model trains on: the batch's ``responses`` are raw × the official
        per-frame precision, and its ``response_scale`` (applied by :meth:`predict_whole_trials`) takes a raw- or
        ViV1T-scale model's predictions there (:class:`~lightning_sensorium.data.normalization.Normalizer`)."""
        if batch.get("padding"):  # a DDP rank's stand-in batch (datamodule.PaddedEvalSampler): not scored
            return None
        key = _metric_key(stage, batch["tier"], batch["mouse_id"])
        if key not in self.metrics:
            return None
        pred = self.predict_whole_trials(batch)  # (B, N, T)
        # Leading NaN of the first trial up to its own length (shorter trials of the batch are NaN past theirs).
        lost = int(torch.isnan(pred[0, 0, : int(batch["length"][0])]).sum())
        if lost > self.skip_frames:
            raise ValueError(f"the core loses {lost} leading frames, more than the {self.skip_frames} skipped frames")
        pred = torch.nan_to_num(pred, nan=0.0)
        windows = "window_start" in batch  # random windows of trials (data.val_windows: official): no repeat metrics
        if windows:  # for every mouse of the stage, also those this rank has not seen yet: the same logged keys
            for other, group in self.metrics.items():
                if other.startswith(f"{stage}::"):
                    group.windows.fill_(1)
        self.metrics[key].update(
            pred, batch["responses"], batch["clip_index"], batch["length"], batch.get("rates"), repeats=not windows
        )
        return pred

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        return self._eval_step("val", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        return self._eval_step("test", batch)

    def _compute(self, stage: str) -> dict[str, Any]:
        """Compute (a collective under DDP: every rank calls it) and reset the stage's metrics."""
        per_tier: dict[str, dict[str, dict[str, Tensor]]] = {}
        for key, group in self.metrics.items():
            st, tier, mouse = key.split("::")
            if st != stage:
                continue
            per_tier.setdefault(tier, {})[mouse] = group.compute()
            group.reset()
        return summarise(per_tier)

    def primary_tier(self, stage: str) -> str:
        """The tier whose metrics are logged without a tier prefix (``val/single_trial_corr``): the first one."""
        dm = self.trainer.datamodule
        return str(dm.val_tiers[0] if stage == "val" else dm.test_tiers[0])

    def _log_results(self, stage: str, results: dict[str, Any]) -> None:
        primary_tier = self.primary_tier(stage)
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
        self.results["val"] = self._compute("val")
        if self.results["val"]:
            self._log_results("val", self.results["val"])

    def on_test_epoch_end(self) -> None:
        self.results["test"] = self._compute("test")
        if self.results["test"]:
            self._log_results("test", self.results["test"])

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any] | None:
        return prediction_record(batch, self.predict_whole_trials)

    # ------------------------------------------------------------------------------------------------- logging
    def configure_callbacks(self) -> list[Callback]:
        """A :class:`FigureLogger` with ``log_figures`` (it replaces one listed in the trainer's callbacks)."""
        return [FigureLogger()] if self.log_figures else []

    def readout_positions(self) -> dict[str, np.ndarray]:
        """Each mouse's readout receptive-field positions ``(N, 2)``, for readouts that have them (figures)."""
        readouts = self._require_encoder().readouts
        return {m: r.positions().detach().cpu().numpy() for m, r in readouts.items() if hasattr(r, "positions")}

    def on_train_start(self) -> None:
        if self.logger is not None:
            # Fill the TensorBoard hparams tab's metric columns.
            self.logger.log_hyperparams(dict(self.hparams), {self.monitor: float("nan"), "best/val_corr": float("nan")})

    # -------------------------------------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> Any:
        groups = self._require_encoder().parameter_groups()
        param_groups: list[dict[str, Any]] = []
        if not self.freeze_core:
            core_group: dict[str, Any] = {"params": groups["core"], "name": "core"}
            if self.core_lr is not None:
                core_group["lr"] = self.core_lr
            param_groups.append(core_group)
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


def _saved_neurons(checkpoint: Mapping[str, Any]) -> dict[str, NeuronInfo]:
    """The per-mouse neuron info a checkpoint carries under :data:`NEURONS_KEY`."""
    return {
        m: NeuronInfo(mouse_id=m, **{k: torch.as_tensor(v).numpy() for k, v in d.items()})
        for m, d in checkpoint.get(NEURONS_KEY, {}).items()
    }


def _read_checkpoint(path: str, option: str) -> dict[str, Any]:
    """A checkpoint of this project (``option`` names the setting in errors)."""
    file = Path(path)
    if not file.is_file():
        raise PretrainedError(f"{option}: no checkpoint {path!r}")
    try:
        # Our checkpoints carry numpy RNG states (resumable fits): not loadable with weights_only=True.
        ckpt = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:
        raise PretrainedError(f"{option}: {path} is not a readable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or NEURONS_KEY not in ckpt:
        raise PretrainedError(
            f"{option}: {path} is not a lightning_sensorium checkpoint (no state_dict and neurons); an original "
            "team's weights are imported first with `lightning-sensorium import-weights`"
        )
    return ckpt


def _check_same_inputs(path: str, ckpt: Mapping[str, Any], model: SensoriumModule, data: Mapping[str, Any]) -> None:
    """Raise unless the checkpoint's core saw inputs like this fit's: frame size, frame step, normalisation."""
    hp, dm = ckpt.get("hyper_parameters", {}), ckpt.get("datamodule_hyper_parameters", {})
    checks = [
        ("model.video_shape (the frame size)", hp.get("video_shape"), model.video_shape),
        ("model.frame_step", hp.get("frame_step", 1), model.frame_step),
        ("data.normalization", dm.get("normalization", "official"), data.get("normalization", "official")),
        ("data.input_statistics", dm.get("input_statistics", "per_frame"), data.get("input_statistics", "per_frame")),
    ]
    for name, theirs, ours in checks:
        if theirs is None or (not data and name.startswith("data.")):  # no data settings: not compared
            continue
        if tuple(np.atleast_1d(theirs)) != tuple(np.atleast_1d(ours)):
            raise PretrainedError(
                f"model.pretrained {path}: its core was trained with {name}={theirs!r}, this fit has {ours!r}; the "
                "core cannot take these inputs (use data of the same format, or the checkpoint's setting)"
            )


def _check_same_shapes(path: str, what: str, theirs: Mapping[str, Tensor], ours: Mapping[str, Tensor]) -> None:
    """Raise unless the two state dicts have the same keys and shapes (the first differences named)."""
    missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    shapes = [
        f"{k}: {tuple(theirs[k].shape)} in the checkpoint, {tuple(ours[k].shape)} here"
        for k in ours
        if k in theirs and theirs[k].shape != ours[k].shape
    ]
    if missing or extra or shapes:
        details = [*(f"{k} missing" for k in missing), *(f"{k} unexpected" for k in extra), *shapes]
        raise PretrainedError(
            f"model.pretrained {path}: the {what} does not fit this configuration ({'; '.join(details[:4])}"
            f"{'; …' if len(details) > 4 else ''}); configure model.core as the checkpoint's run did "
            "(its config.yaml) — a different behaviour or pupil input changes the core's input channels too"
        )


def _mean_shifter(path: str, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The parameter mean of the checkpoint's per-mouse shifters (``model.pretrained_shifter: mean``)."""
    mice = sorted({k.split(".")[2] for k in state if k.startswith("encoder.shifters.")})
    if not mice:
        raise PretrainedError(
            f"model.pretrained_shifter=mean: {path} has no shifters (set model.pretrained_shifter=fresh)"
        )
    parts = [
        {
            k.removeprefix(f"encoder.shifters.{m}."): v
            for k, v in state.items()
            if k.startswith(f"encoder.shifters.{m}.")
        }
        for m in mice
    ]
    return {k: torch.stack([p[k].float() for p in parts]).mean(0).to(parts[0][k].dtype) for k in parts[0]}


def _unscaled(responses: Tensor, scale: Tensor | None) -> Tensor:
    """Official-scale ``responses (..., N, T)`` divided by their ``response_scale`` (same shape; > 0 everywhere):
    each neuron's responses on one scale for all frames, ``raw × mean precision`` (``data.response_scale``)."""
    return responses if scale is None else responses / scale.to(responses.dtype)
