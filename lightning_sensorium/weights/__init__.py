"""Import the weights the SENSORIUM 2023 teams published into our checkpoints.

Each format module (``starter_kit``, ``dwiseneuro``, ``viv1t``, ``dynamic_v1fm``) reads one original
checkpoint exactly as that code writes it and translates it to :class:`OriginalWeights`;
:mod:`lightning_sensorium.weights.importer` builds our module at the original's sizes, maps the
original's mouse keys to our ``mouse_id``\\ s, checks the neuron counts and writes our checkpoint.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch


class WeightsError(ValueError):
    """An original checkpoint that cannot be imported (names the file and what differs)."""


@dataclass(frozen=True)
class OriginalWeights:
    """One original checkpoint translated to SensoriumModule's keys."""

    source: Path  # the file read (for error messages)
    architecture: str  # experiments/<architecture>.yaml builds it: gru|factorized|dwiseneuro|viv1t|dynamic_v1fm
    config_args: tuple[str, ...]  # LightningCLI args setting the original's sizes over that YAML
    # SensoriumModule.state_dict() keys; per-mouse parts keyed by the ORIGINAL mouse key:
    # "encoder.readouts.<key>.…", "encoder.shifters.<key>.…"
    state_dict: dict[str, torch.Tensor]
    neurons: dict[str, int]  # original mouse key → neuron count, readout order
    mouse_ids: dict[str, str]  # original mouse key → our mouse_id where the file/config says it; else identity
    unit_ids: dict[str, np.ndarray] = field(default_factory=dict)  # where the original records them


ARCHITECTURES = ("gru", "factorized", "dwiseneuro", "viv1t", "dynamic_v1fm")


def load_torch_file(path: Path, safe_globals: Sequence[Any] = ()) -> Any:
    """``torch.load`` of an original's file on the CPU, without running its pickled code (``weights_only``: only
    tensors, containers, primitives and ``safe_globals`` are rebuilt); a missing, truncated or foreign file raises
    :class:`WeightsError` (or FileNotFoundError) naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, OSError, RuntimeError, zipfile.BadZipFile, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(
            f"{path}: not a readable PyTorch checkpoint (truncated or another kind of file): {first}"
        ) from e


def first_rename(name: str, renames: Sequence[tuple[re.Pattern[str], str]]) -> str | None:
    """``name`` rewritten by the first ``(pattern, replacement)`` whose pattern matches its start; None if none
    does (a name the other side does not have)."""
    for pattern, new in renames:
        if pattern.match(name):
            return pattern.sub(new, name)
    return None


def state_dict_of(value: Any, path: Path, what: str) -> dict[str, torch.Tensor]:
    """``value`` as a flat ``name → tensor`` dict, or :class:`WeightsError` saying that ``path`` holds no ``what``."""
    if (
        not isinstance(value, dict)
        or not value
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    ):
        raise WeightsError(f"{path}: expected {what} (a dict of name → tensor), found {type(value).__name__}")
    return value


__all__ = ["ARCHITECTURES", "OriginalWeights", "WeightsError", "first_rename", "load_torch_file", "state_dict_of"]
