"""Ensembles: several checkpoints (any architectures) predicting as one model, and the 14-seed baseline recipe.

:class:`EnsembleModule` averages the members' :meth:`SensoriumModule.predict_whole_trials` — firing rates, after
each member's output activation, the way every SENSORIUM 2023 winner ensembles (docs/evaluation.md). A frame that
some members cannot predict (a shorter temporal receptive field than others) is the mean of the members that do;
a frame no member predicts stays NaN. ``evaluate``, ``predict`` and ``submit`` all take one checkpoint or several
and go through this module, so a single model is just an ensemble of one.

:func:`train_ensemble` is the paper's ensemble baseline: one experiment config (e.g. ``factorized.yaml``) fitted
once per seed, sequentially, on the same data, then evaluated as the average of the members.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from lightning_sensorium.data.batch import NeuronInfo, check_same_neurons
from lightning_sensorium.data.datamodule import SensoriumDataModule
from lightning_sensorium.launch import run_lightning, with_experiment_defaults
from lightning_sensorium.module import SensoriumModule
from lightning_sensorium.predictors import mean_where_predicted, prediction_record

log = logging.getLogger(__name__)


def _load_checkpoint_dict(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    return torch.load(path, map_location="cpu", weights_only=False)


class EnsembleModule(L.LightningModule):
    """Averages the firing-rate predictions of several trained :class:`SensoriumModule` members.

    Every member must know the same unit ids for every mouse they share; the ensemble predicts the mice that all
    members know. Built with :meth:`from_checkpoints`; ``datamodule_hparams`` are the first checkpoint's data
    settings (data root, normalisation, …), which every member must agree on where it changes the inputs.

    Args:
        members: the trained modules.
        checkpoints: where each member was loaded from (reported in results).
        datamodule_hparams: the datamodule settings to rebuild the data with.
    """

    def __init__(
        self,
        members: Sequence[nn.Module],
        checkpoints: Sequence[str] = (),
        datamodule_hparams: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.checkpoints = [str(c) for c in checkpoints]
        self.datamodule_hparams = dict(datamodule_hparams or {})
        member_neurons: list[Mapping[str, NeuronInfo]] = [getattr(m, "neurons", {}) for m in members]
        self.neurons: dict[str, NeuronInfo] = _shared_neurons(member_neurons, self.checkpoints)

    @classmethod
    def from_checkpoints(cls, paths: Sequence[str | Path]) -> EnsembleModule:
        """Load every checkpoint (on the CPU) and check that they fit together."""
        files = [Path(p) for p in paths]
        if not files:
            raise ValueError("an ensemble needs at least one checkpoint path")
        members, hparams = [], []
        for path in files:
            ckpt = _load_checkpoint_dict(path)
            dm = dict(ckpt.get("datamodule_hyper_parameters", {}))
            dm.pop("_instantiator", None)
            hparams.append(dm)
            members.append(SensoriumModule.load_from_checkpoint(path, map_location="cpu"))
        first = hparams[0]
        for path, hp in zip(files[1:], hparams[1:], strict=True):
            for key, default in (
                ("normalization", "official"),
                ("response_scale", False),
                ("input_statistics", "per_frame"),
            ):
                if hp.get(key, default) != first.get(key, default):
                    raise ValueError(
                        f"checkpoint {path} was trained with data.{key}={hp.get(key)!r} but {files[0]} with "
                        f"{first.get(key)!r}; ensemble members must see the same inputs and predict the same scale"
                    )
        return cls(members, [str(p) for p in files], first)

    def predict_whole_trials(self, batch: Mapping[str, Any]) -> Tensor:
        """The members' mean prediction ``(B, N, T)`` (NaN only where no member predicts a frame)."""
        return mean_where_predicted(member.predict_whole_trials(batch) for member in self.members)  # type: ignore[operator]

    def forward(self, batch: Mapping[str, Any]) -> Tensor:
        return self.predict_whole_trials(batch)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any] | None:
        return prediction_record(batch, self.predict_whole_trials)

    @property
    def skip_frames(self) -> int:
        return int(getattr(self.members[0], "skip_frames", 50))

    def check_data(self, data_neurons: Mapping[str, NeuronInfo]) -> None:
        """Raise unless every mouse of the data is known to the ensemble with the same unit ids (in order)."""
        check_same_neurons(self.neurons, data_neurons, names=("the checkpoint(s)", "the data"), mice="covered")


def _shared_neurons(per_member: Sequence[Mapping[str, NeuronInfo]], names: Sequence[str]) -> dict[str, NeuronInfo]:
    """Mice every member knows; raise if two members disagree on a shared mouse's unit ids."""
    first = dict(per_member[0])
    shared = set(first)
    for i, neurons in enumerate(per_member[1:], start=1):
        who = names[i] if i < len(names) else f"member {i}"
        reference = {m: first[m] for m in first if m in shared}
        check_same_neurons(reference, neurons, names=("the first member", f"ensemble member {who}"), mice="shared")
        shared &= set(neurons)
    if not shared:
        raise ValueError("the ensemble members share no mouse")
    return {m: first[m] for m in sorted(shared)}


def load_ensemble(paths: Sequence[str | Path], data: Mapping[str, Any] | None = None) -> tuple[EnsembleModule, Any]:
    """The ensemble of ``paths`` and the datamodule it was trained with (``data`` overrides, e.g. ``root``)."""
    model = EnsembleModule.from_checkpoints(paths)
    hparams = dict(model.datamodule_hparams)
    hparams.update({k: v for k, v in (data or {}).items() if v is not None})
    if hparams.get("mice") is None:
        hparams["mice"] = list(model.neurons)  # not every store under the root: the mice the model knows
    dm = SensoriumDataModule(**hparams)
    model.check_data(dm.neurons)
    return model, dm


def best_checkpoint(trainer: L.Trainer) -> str:
    """The best checkpoint of a finished fit (by its ModelCheckpoint's monitor), else the last one."""
    cb = trainer.checkpoint_callback
    path = getattr(cb, "best_model_path", "") or getattr(cb, "last_model_path", "")
    if not path:
        raise RuntimeError("the fit wrote no checkpoint: keep a ModelCheckpoint callback in the config")
    return str(path)


def train_ensemble(config: str | Path, seeds: Sequence[int], fit_args: Sequence[str] = ()) -> list[str]:
    """Fit ``config`` once per seed, one after the other; returns each run's best checkpoint.

    Each run gets ``--seed_everything SEED`` (which also seeds the data sampling through ``data.seed``) and its own
    TensorBoard version ``seed<SEED>``; ``fit_args`` are passed to every ``fit`` (e.g. ``--data.root``).
    """
    if not seeds:
        raise ValueError("seeds: give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {list(seeds)}: seeds must be distinct")
    if not Path(config).is_file():
        raise FileNotFoundError(f"experiment config {config}: no such file")
    checkpoints = []
    for seed in seeds:
        args = with_experiment_defaults(
            [
                "fit",
                "--config",
                str(config),
                "--seed_everything",
                str(seed),
                "--trainer.logger.init_args.version",
                f"seed{seed}",
                *fit_args,
            ]
        )
        log.info("ensemble: fitting seed %d", seed)
        cli = run_lightning(args)
        checkpoints.append(best_checkpoint(cli.trainer))
    return checkpoints
