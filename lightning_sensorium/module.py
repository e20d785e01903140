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
        self.log_figures = log_figures
        self.dataset_sizes = dict(dataset_sizes or {})
        self.video_shape: tuple[int, int] = (int(video_shape[0]), int(video_shape[1]))
        self.output_activation = output_activation
        self.neurons: dict[str, NeuronInfo] = {}
        # The core is held by the encoder only; per-mouse parts are added once the neurons are known.
        self.encoder = Encoder(core, nn.ModuleDict(), None, output_activation)
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
        """Predicted responses ``(B, N, T_out)`` aligned to the last ``T_out`` frames of ``batch['video']``."""
        encoder = self._require_encoder()
        return encoder(
            batch["video"], batch["mouse_id"], behavior=batch.get("behavior"), pupil_center=batch.get("pupil_center")
        )

    def predict_full(self, batch: Mapping[str, Any]) -> Tensor:
        """Predictions for every frame of the batch ``(B, N, T)``; frames the core cannot predict are NaN."""
        pred = self(batch)  # (B, N, T_out)
        t = batch["video"].shape[2]
        lost = t - pred.shape[-1]
        if lost <= 0:
            return pred[..., -t:]
        return torch.nn.functional.pad(pred, (lost, 0), value=float("nan"))

    # ------------------------------------------------------------------------------------------------ training
    def on_fit_start(self) -> None:
        if self.accumulate_over_mice and len(self.neurons) > 1:
            # LongCycler: one batch per mouse, one optimizer step per cycle.
            self.trainer.accumulate_grad_batches = len(self.neurons)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        mouse = batch["mouse_id"]
        if not isinstance(mouse, str):
            return self._mixed_training_step(batch)
        pred = self(batch)  # (B, N, T_out)
        target = batch["responses"][..., -pred.shape[-1] :]  # (B, N, T_out)
        loss = self.loss_fn(pred, target, None, self.dataset_sizes.get(mouse, pred.shape[0]))
        reg = self._require_encoder().regularizer(mouse)
        total = loss + reg
        bs = pred.shape[0]
        self.log("train/loss", loss, batch_size=bs, prog_bar=True)
        self.log("train/regularizer", reg, batch_size=bs)
        return total

    def _mixed_training_step(self, batch: dict[str, Any]) -> Tensor:
        """Mice mixed inside a batch: run each mouse's sub-batch through its readout, sum the losses."""
        mice: list[str] = batch["mouse_id"]
        total = torch.zeros((), device=self.device)
        for mouse in sorted(set(mice)):
            idx = [i for i, m in enumerate(mice) if m == mouse]
            sub = {k: batch[k][idx] for k in ("video", "behavior", "pupil_center")}
            sub["mouse_id"] = mouse
            pred = self(sub)  # (b, N, T_out)
            target = torch.stack([batch["responses"][i] for i in idx])[..., -pred.shape[-1] :]
            total = total + self.loss_fn(pred, target, None, self.dataset_sizes.get(mouse, len(idx)))
            total = total + self._require_encoder().regularizer(mouse)
        self.log("train/loss", total, batch_size=len(mice), prog_bar=True)
        return total

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

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
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
        config: dict[str, Any] = {"scheduler": scheduler, "interval": self.scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = self.monitor
        return {"optimizer": optimizer, "lr_scheduler": config}


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
