"""Original checkpoints → our checkpoints: ``lightning-sensorium import-weights``.

Each file is read by its format module (:data:`READERS`) into :class:`OriginalWeights`; the module is built from
``experiments/<architecture>.yaml`` with the original's sizes (``config_args``) on the stores of the mice it names
(LightningCLI, as ``fit`` builds it), the original's mouse keys are mapped to our ``mouse_id``\\ s, every mouse's
neuron count (and unit ids and readout coordinates where the original records them) is checked against the store,
and the weights are loaded strictly. The result is an ordinary checkpoint: ``evaluate``, ``infer``, ``submit``,
``ensemble`` and ``fit --ckpt_path`` (fine-tuning: a fresh optimizer, epoch 0) read it unchanged.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from lightning_sensorium.atomic import atomic_dir, atomic_file
from lightning_sensorium.data.datamodule import SensoriumDataModule, discover_stores
from lightning_sensorium.launch import run_lightning, with_experiment_defaults
from lightning_sensorium.module import SensoriumModule
from lightning_sensorium.weights import ARCHITECTURES, OriginalWeights, WeightsError

#: Readout buffers computed from the store's neuron coordinates: where the original's file holds them, they must
#: match ours (another neuron order or other neurons otherwise).
DATA_BUFFERS = ("source_grid",)


def _reader(architecture: str) -> Callable[[Path], OriginalWeights]:
    """The ``read`` of ``architecture``'s format module (imported on use: each knows one original)."""
    if architecture in ("gru", "factorized"):
        from lightning_sensorium.weights import starter_kit

        return lambda path: starter_kit.read(path, architecture)
    if architecture == "dwiseneuro":
        from lightning_sensorium.weights import dwiseneuro

        return dwiseneuro.read
    if architecture == "viv1t":
        from lightning_sensorium.weights import viv1t

        return viv1t.read
    if architecture == "dynamic_v1fm":
        from lightning_sensorium.weights import dynamic_v1fm

        return dynamic_v1fm.read
    raise ValueError(f"--from {architecture!r}: expected one of {list(ARCHITECTURES)}")


def mouse_ids_of(weights: OriginalWeights, mouse_map: Mapping[str, str] | None = None) -> dict[str, str]:
    """Original mouse key → our ``mouse_id``: ``mouse_map`` (the user's, keyed by the original's key or by the
    mouse id the file names) first, then what the file says."""
    user = dict(mouse_map or {})
    default = {key: weights.mouse_ids.get(key, key) for key in weights.neurons}
    unknown = sorted(set(user) - set(default) - set(default.values()))
    if unknown:
        raise WeightsError(f"{weights.source}: no mouse {unknown} in the file; its mice: {default}")
    mapping = {key: user.get(key, user.get(default[key], default[key])) for key in weights.neurons}
    ids = list(mapping.values())
    if len(set(ids)) != len(ids):
        raise WeightsError(f"{weights.source}: two mouse keys map to the same mouse_id: {mapping}")
    return mapping


def build_module(
    weights: OriginalWeights, data_root: Path, mice: Sequence[str], experiments: Path = Path("experiments")
) -> tuple[SensoriumModule, SensoriumDataModule, L.Trainer]:
    """Our module at the original's sizes, with readouts for ``mice`` (their stores under ``data_root``), its
    datamodule and the (unused) trainer the experiment configures."""
    config = experiments / f"{weights.architecture}.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{config}: no such experiment config (run from the repository, or pass --experiments)")
    try:
        discover_stores(str(data_root), list(mice), None)
    except FileNotFoundError as e:
        raise WeightsError(f"{weights.source}: a mouse of the file has no store: {e}") from e
    args = [
        *with_experiment_defaults(["--config", str(config)]),
        *weights.config_args,
        *("--data.root", str(data_root), "--data.mice", json.dumps(list(mice)), "--data.mouse_selection", "all"),
        *("--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]"),
    ]
    try:
        with _quiet_build():
            cli = run_lightning(args, run=False)
    except SystemExit as e:  # jsonargparse refused an option (it printed why)
        raise WeightsError(f"{weights.source}: {config} does not take the original's configuration {args}") from e
    return cli.model, cli.datamodule, cli.trainer


@contextlib.contextmanager
def _quiet_build() -> Iterator[None]:
    """Building the module for an import is not a run: no "Seed set", "GPU available" or datamodule notes (such as
    ViV1T's recipe training on test tiers) on the console; warnings and errors still show."""
    names = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.seed", "lightning_sensorium.data")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def check_neurons(weights: OriginalWeights, mapping: Mapping[str, str], module: SensoriumModule) -> None:
    """Every mouse's neuron count, and unit ids where the original records them, equal the store's."""
    for key, mouse in mapping.items():
        ours = module.neurons[mouse]
        if weights.neurons[key] != ours.num_neurons:
            raise WeightsError(
                f"{weights.source}: mouse {key!r} has {weights.neurons[key]} neurons in the file but the store of "
                f"{mouse} has {ours.num_neurons}"
            )
        if key in weights.unit_ids and not np.array_equal(np.asarray(weights.unit_ids[key]), ours.unit_ids):
            raise WeightsError(
                f"{weights.source}: mouse {key!r}: the file's unit ids differ from the store's unit_ids of {mouse} "
                "(other neurons, or another order; never reordered silently)"
            )


def translated_state(
    weights: OriginalWeights, mapping: Mapping[str, str], module: SensoriumModule
) -> dict[str, torch.Tensor]:
    """The file's state dict with per-mouse keys renamed to our ``mouse_id``\\ s; data-derived buffers checked."""
    ours = module.state_dict()
    state: dict[str, torch.Tensor] = {}
    for name, value in weights.state_dict.items():
        for key, mouse in mapping.items():
            for part in ("readouts", "shifters"):
                prefix = f"encoder.{part}.{key}."
                if name.startswith(prefix):
                    name = f"encoder.{part}.{mouse}.{name[len(prefix) :]}"
                    break
            else:
                continue
            break
        if name.rsplit(".", 1)[-1] in DATA_BUFFERS and name in ours:
            expected = ours[name]
            if expected.shape != value.shape or not torch.allclose(expected, value.to(expected.dtype), atol=1e-5):
                raise WeightsError(
                    f"{weights.source}: {name}: the file's neuron positions differ from the store's coordinates "
                    "(other neurons, or another order; never reordered silently)"
                )
        state[name] = value
    return state


def load_into(module: SensoriumModule, state: Mapping[str, torch.Tensor], source: Path) -> None:
    """``load_state_dict(strict=True)``; any missing, unexpected or misshaped entry is a :class:`WeightsError`."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        parts = [
            f"{what} {names[:5]}{' …' if len(names) > 5 else ''}"
            for what, names in (("missing", missing), ("unexpected", unexpected), ("other shape", shapes))
            if names
        ]
        raise WeightsError(
            f"{source}: does not fit the {type(module.encoder.core).__name__} it configures: " + "; ".join(parts)
        )
    module.load_state_dict(dict(state), strict=True)


def checkpoint_dict(module: SensoriumModule, datamodule: SensoriumDataModule, trainer: L.Trainer) -> dict[str, Any]:
    """A Lightning checkpoint of ``module`` at step 0 (what ``Trainer.save_checkpoint`` writes, with no optimizer
    state yet; ``trainer`` has not run): ``load_from_checkpoint`` rebuilds it, ``fit --ckpt_path`` fine-tunes it with
    a fresh optimizer."""
    loops = {"fit_loop": trainer.fit_loop, "validate_loop": trainer.validate_loop, "test_loop": trainer.test_loop}
    checkpoint: dict[str, Any] = {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": L.__version__,
        "state_dict": module.state_dict(),
        "loops": {name: loop.state_dict() for name, loop in {**loops, "predict_loop": trainer.predict_loop}.items()},
        "callbacks": {},
        "optimizer_states": [],
        "lr_schedulers": [],
    }
    for obj in (module, datamodule):  # as Trainer.save_checkpoint dumps them
        if hasattr(obj, "_hparams_name"):
            checkpoint[obj.CHECKPOINT_HYPER_PARAMS_NAME] = obj._hparams_name
        checkpoint[obj.CHECKPOINT_HYPER_PARAMS_KEY] = dict(obj.hparams)
    module.on_save_checkpoint(checkpoint)
    return checkpoint


def convert_one(
    weights: OriginalWeights,
    data_root: Path,
    mouse_map: Mapping[str, str] | None = None,
    experiments: Path = Path("experiments"),
) -> tuple[SensoriumModule, dict[str, Any]]:
    """One original file → our module with its weights, and the checkpoint dict to save."""
    mapping = mouse_ids_of(weights, mouse_map)
    module, datamodule, trainer = build_module(weights, data_root, list(mapping.values()), experiments)
    check_neurons(weights, mapping, module)
    load_into(module, translated_state(weights, mapping, module), weights.source)
    module.eval()
    return module, checkpoint_dict(module, datamodule, trainer)


def import_weights(
    architecture: str,
    files: Sequence[Path],
    data_root: Path,
    out: Path,
    mouse_map: Mapping[str, str] | None = None,
    experiments: Path = Path("experiments"),
) -> list[Path]:
    """Import ``files`` (one original's checkpoints) into our checkpoints; returns the paths written.

    One file: ``out`` is the checkpoint file. Several (an ensemble): ``out`` is a folder of ``member-<i>.ckpt``,
    written whole or not at all; ``evaluate``/``submit --ckpt_path OUT/*.ckpt`` average them. Every file is read and
    checked before anything is written.
    """
    if not files:
        raise ValueError("import-weights: name at least one original checkpoint file")
    read = _reader(architecture)
    if len(files) == 1:
        checkpoint = convert_one(read(Path(files[0])), data_root, mouse_map, experiments)[1]
        with atomic_file(out) as tmp:
            torch.save(checkpoint, tmp)
        return [out]
    names = [f"member-{i:02d}.ckpt" for i in range(len(files))]
    with atomic_dir(out) as tmp:  # one member in memory at a time; the folder appears whole or not at all
        for name, file in zip(names, files, strict=True):
            torch.save(convert_one(read(Path(file)), data_root, mouse_map, experiments)[1], tmp / name)
    return [out / name for name in names]
