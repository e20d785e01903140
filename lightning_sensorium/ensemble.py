"""Ensembles: several checkpoints (any architectures) predicting as one model, and the 14-seed baseline recipe.

:class:`EnsembleModule` averages the members' :meth:`SensoriumModule.predict_full` outputs — firing rates, after
each member's output activation, the way every SENSORIUM 2023 winner ensembles (models.md §3, §4). A frame that
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
import numpy as np
import torch
from torch import Tensor, nn

from lightning_sensorium.data.batch import NeuronInfo

log = logging.getLogger(__name__)


def _load_checkpoint_dict(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt_path {path}: no such checkpoint file")
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
            raise ValueError("an ensemble needs at least one checkpoint (--ckpt_path)")
        self.members = nn.ModuleList(members)
        self.checkpoints = [str(c) for c in checkpoints]
        self.datamodule_hparams = dict(datamodule_hparams or {})
        member_neurons: list[Mapping[str, NeuronInfo]] = [getattr(m, "neurons", {}) for m in members]
        self.neurons: dict[str, NeuronInfo] = _shared_neurons(member_neurons, self.checkpoints)

    @classmethod
    def from_checkpoints(cls, paths: Sequence[str | Path]) -> EnsembleModule:
        """Load every checkpoint (on the CPU) and check that they fit together."""
        from lightning_sensorium.module import SensoriumModule

        files = [Path(p) for p in paths]
        if not files:
            raise ValueError("--ckpt_path: give at least one checkpoint")
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
                        f"--ckpt_path: {path} was trained with data.{key}={hp.get(key)!r} but {files[0]} with "
                        f"{first.get(key)!r}; ensemble members must see the same inputs and predict the same scale"
                    )
        return cls(members, [str(p) for p in files], first)

    def predict_full(self, batch: Mapping[str, Any]) -> Tensor:
        """The members' mean prediction ``(B, N, T)`` (NaN only where no member predicts a frame)."""
        total: Tensor | None = None
        count: Tensor | None = None
        for member in self.members:
            pred = member.predict_full(batch).float()  # type: ignore[operator]  # (B, N, T)
            ok = torch.isfinite(pred)
            value = torch.where(ok, pred, 0.0)
            total = value if total is None else total + value
            count = ok.float() if count is None else count + ok.float()
        assert total is not None and count is not None
        return torch.where(count > 0, total / count.clamp_min(1), float("nan"))

    def forward(self, batch: Mapping[str, Any]) -> Tensor:
        return self.predict_full(batch)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return {
            "mouse_id": batch["mouse_id"],
            "tier": batch.get("tier"),
            "trial": batch["trial"],
            "length": batch["length"],
            "prediction": self.predict_full(batch),
        }

    @property
    def skip_frames(self) -> int:
        return int(getattr(self.members[0], "skip_frames", 50))

    def check_data(self, data_neurons: Mapping[str, NeuronInfo]) -> None:
        """Raise unless every mouse of the data is known to the ensemble with the same unit ids (in order)."""
        unknown = sorted(set(data_neurons) - set(self.neurons))
        if unknown:
            raise ValueError(
                f"the checkpoint(s) have no readout for mice {unknown} of the data (they know {sorted(self.neurons)}); "
                "select mice with --data.mice"
            )
        for mouse, info in data_neurons.items():
            a, b = np.asarray(self.neurons[mouse].unit_ids), np.asarray(info.unit_ids)
            if a.shape != b.shape or not np.array_equal(a, b):
                raise ValueError(
                    f"mouse {mouse}: the checkpoint has {a.shape[0]} neurons, the data {b.shape[0]} "
                    "(or different unit_ids)"
                )


def _shared_neurons(per_member: Sequence[Mapping[str, NeuronInfo]], names: Sequence[str]) -> dict[str, NeuronInfo]:
    """Mice every member knows; raise if two members disagree on a shared mouse's unit ids."""
    first = dict(per_member[0])
    shared = set(first)
    for i, neurons in enumerate(per_member[1:], start=1):
        for mouse in shared & set(neurons):
            a, b = np.asarray(first[mouse].unit_ids), np.asarray(neurons[mouse].unit_ids)
            if a.shape != b.shape or not np.array_equal(a, b):
                who = names[i] if i < len(names) else f"member {i}"
                raise ValueError(f"ensemble member {who}: mouse {mouse} has other neurons than the first member")
        shared &= set(neurons)
    if not shared:
        raise ValueError("the ensemble members share no mouse")
    return {m: first[m] for m in sorted(shared)}


def load_ensemble(paths: Sequence[str | Path], data: Mapping[str, Any] | None = None) -> tuple[EnsembleModule, Any]:
    """The ensemble of ``paths`` and the datamodule it was trained with (``data`` overrides, e.g. ``root``)."""
    from lightning_sensorium.data.datamodule import SensoriumDataModule

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
    from lightning_sensorium.cli import lightning_main, with_defaults

    if not seeds:
        raise ValueError("--seeds: give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {list(seeds)}: seeds must be distinct")
    if not Path(config).is_file():
        raise FileNotFoundError(f"--config {config}: no such file")
    checkpoints = []
    for seed in seeds:
        args = with_defaults(
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
        cli = lightning_main(args)
        checkpoints.append(best_checkpoint(cli.trainer))
    return checkpoints
