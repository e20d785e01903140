"""FigureLogger: TensorBoard figures of a module's validation and test results.

``SensoriumModule`` adds it itself (``model.log_figures``, through Lightning's ``configure_callbacks``).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor


class FigureLogger(Callback):
    """Draws, after validation (not the sanity check) and after testing, on the first TensorBoard logger:

    * ``<stage>/correlation_histogram``: the per-neuron single-trial correlations of the primary tier, per mouse;
    * ``<stage>/traces``: recorded vs predicted traces of the best-predicted neurons of the first trial evaluated;
    * ``<stage>/readout_positions``: the readouts' receptive-field positions (readouts that have them).

    It reads what the module exposes: ``results[stage]`` (``per_mouse_vectors`` of each tier),
    ``primary_tier(stage)``, ``skip_frames``, ``readout_positions()`` and the ``(B, N, T)`` predictions its
    evaluation steps return.
    """

    def __init__(self) -> None:
        self._first: dict[str, Any] | None = None

    def _keep_first(self, outputs: Any, batch: Any) -> None:
        if self._first is None and isinstance(outputs, Tensor):
            self._first = {
                "mouse_id": batch["mouse_id"],
                "pred": outputs[0].detach().float().cpu(),  # (N, T)
                "target": batch["responses"][0].detach().float().cpu(),  # (N, T)
            }

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._first = None

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._first = None

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        self._keep_first(outputs, batch)

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        self._keep_first(outputs, batch)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the module's on_validation_epoch_end, which computes the results.
        if not trainer.sanity_checking:
            self._draw(trainer, pl_module, "val")
        self._first = None

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._draw(trainer, pl_module, "test")
        self._first = None

    def _draw(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        results = getattr(pl_module, "results", {}).get(stage)
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not results or not loggers or not trainer.is_global_zero:
            return
        # matplotlib loads only when a figure is drawn (importing the module stays light).
        from lightning_sensorium.figures import correlation_histogram, readout_positions, traces

        writer, step = loggers[0].experiment, trainer.global_step
        vectors = results[pl_module.primary_tier(stage)]["per_mouse_vectors"]
        per_neuron = {m: v["single_trial_corr_per_neuron"] for m, v in vectors.items()}
        writer.add_figure(f"{stage}/correlation_histogram", correlation_histogram(per_neuron), step)
        first = self._first
        if first is not None and first["mouse_id"] in per_neuron:
            corr = per_neuron[first["mouse_id"]]
            fig = traces(first["pred"], first["target"], corr, pl_module.skip_frames, mouse_id=first["mouse_id"])
            writer.add_figure(f"{stage}/traces", fig, step)
        positions = pl_module.readout_positions()
        if positions:
            writer.add_figure(f"{stage}/readout_positions", readout_positions(positions), step)
