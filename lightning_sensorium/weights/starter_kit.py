"""The SENSORIUM 2023 starter kit's baselines (GRU and factorized): ``model.state_dict()`` of its
``VideoFiringRateEncoder``, as ``sensorium/training/video_training_loop.py`` saves it (``final.pth``).

https://github.com/ecker-lab/sensorium_2023 builds the model (``sensorium/models/make_model.py``) from
https://github.com/sinzlab/neuralpredictors modules: ``core.*``, ``gru_module.gru.*`` (GRU only),
``readout.<data_key>.*`` and ``shifter.<data_key>.mlp.*``. Its data keys are the session folder names, our
``mouse_id``\\ s. A state dict holds no configuration: the sizes are read from the tensor shapes; the settings it does
not record (unpadded input layer, stride 1, a final ``tanh`` on the grid predictor) are the benchmark notebook's.
The name mapping here is the one home of it: ``benchmarks/bench_{gru,factorized}_forward.py`` use it too.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from lightning_sensorium.weights import OriginalWeights, WeightsError, load_torch_file, state_dict_of

#: The original's constants, never state in ours: Laplace filters of its regularisers, the Hermite basis.
_CONSTANTS = re.compile(r"(^|\.)(_input_weights?_regularizer|temporal_regularizer)\.|\.rotate_hermite\.")

_READOUT_RENAMES = {"mu_transform.": "grid_predictor.", "_features": "features"}
_READOUT = re.compile(r"^readout\.([^.]+)\.(.+)$")
_SHIFTER = re.compile(r"^shifter\.([^.]+)\.(.+)$")


def _head_key(name: str) -> str | None:
    """Our name of a per-mouse readout or shifter entry, or None for core entries."""
    if m := _READOUT.match(name):
        rest = m.group(2)
        for old, new in _READOUT_RENAMES.items():
            rest = rest.replace(old, new)
        return f"readouts.{m.group(1)}.{rest}"
    if m := _SHIFTER.match(name):
        return f"shifters.{m.group(1)}.{m.group(2)}"
    return None


def gru_key(name: str) -> str | None:
    """Our :class:`~lightning_sensorium.models.Encoder` name of a GRU-baseline entry; None for its constants."""
    if _CONSTANTS.search(name):
        return None
    if (head := _head_key(name)) is not None:
        return head
    out = re.sub(r"^core\.features\.layer(\d+)\.hermite_conv\.", r"core.cnn.\1.conv.", name)
    out = re.sub(r"^core\.features\.layer(\d+)\.norm\.batch_norm\.", r"core.cnn.\1.norm.", out)
    return re.sub(r"^gru_module\.gru\.", "core.gru.", out)


def factorized_key(name: str) -> str | None:
    """Our :class:`~lightning_sensorium.models.Encoder` name of a factorized-baseline entry; None for its constants."""
    if _CONSTANTS.search(name):
        return None
    if (head := _head_key(name)) is not None:
        return head
    out = re.sub(r"^core\.features\.layer(\d+)\.(conv_spatial|conv_temporal)(_\d+)?\.", r"core.layers.\1.\2.", name)
    return re.sub(r"^core\.features\.layer(\d+)\.norm\.", r"core.layers.\1.norm.", out)


KEY_MAPS = {"gru": gru_key, "factorized": factorized_key}

#: A key only this architecture's state dict has (tells the two baselines, and other files, apart).
_SIGNATURES = {
    "gru": "core.features.layer0.hermite_conv.coeffs",
    "factorized": "core.features.layer0.conv_spatial.weight",
}


def _layers(state: Mapping[str, Tensor], pattern: str) -> list[int]:
    """Sorted layer indices ``i`` of the keys matching ``pattern.format(i=...)`` (a regex with one group)."""
    return sorted({int(m.group(1)) for k in state if (m := re.match(pattern, k))})


def _behavior_args(source: Path, in_channels: int) -> list[str]:
    """Our core's input switches for the original's input channels (video, +2 behaviour, +2 pupil centre)."""
    options = {1: (False, False), 3: (True, False), 5: (True, True)}
    if in_channels not in options:
        raise WeightsError(f"{source}: the core reads {in_channels} input channels; expected 1, 3 or 5")
    behavior, pupil = options[in_channels]
    return ["behavior_channels", json.dumps(behavior), "pupil_channels", json.dumps(pupil)]


def _head_args(source: Path, state: Mapping[str, Tensor], mouse: str) -> list[str]:
    """Readout (Gaussian with a cortex grid predictor) and shifter sizes from one mouse's entries."""
    grid = [k for k in state if k.startswith(f"readout.{mouse}.mu_transform.") and k.endswith(".weight")]
    if len(grid) != 2:
        raise WeightsError(
            f"{source}: readout of {mouse} is not a FullGaussian2d with a one-hidden-layer cortex grid predictor "
            f"(the starter kit's); found {sorted(k for k in state if k.startswith(f'readout.{mouse}.'))}"
        )
    args = [
        "--model.readout.init_args.grid_hidden_features",
        str(state[f"readout.{mouse}.mu_transform.0.weight"].shape[0]),
    ]
    args += ["--model.readout.init_args.bias", json.dumps(f"readout.{mouse}.bias" in state)]
    mlp = sorted(k for k in state if k.startswith(f"shifter.{mouse}.mlp.") and k.endswith(".weight"))
    if not mlp:
        return [*args, "--model.shifter", "null"]
    first = state[f"shifter.{mouse}.mlp.0.weight"]
    args += ["--model.shifter.init_args.layers", str(len(mlp)), "--model.shifter.init_args.input_channels"]
    args += [str(first.shape[1]), "--model.shifter.init_args.hidden_channels", str(first.shape[0])]
    return args


def _gru_core_args(source: Path, state: Mapping[str, Tensor]) -> list[str]:
    layers = _layers(state, r"^core\.features\.layer(\d+)\.hermite_conv\.coeffs$")
    coeffs = [state[f"core.features.layer{i}.hermite_conv.coeffs"] for i in layers]  # (n, in, hidden)
    hidden = int(coeffs[0].shape[2])
    gru_in = state["gru_module.gru.update_gate_input.weight"]  # (gru, rotations·hidden, k, k)
    rec = state["gru_module.gru.update_gate_hidden.weight"]  # (gru, gru, k, k)
    rotations, rest = divmod(int(gru_in.shape[1]), hidden)
    kernels = [int((math.isqrt(8 * int(c.shape[0]) + 1) - 1) // 2) for c in coeffs]  # n = k(k+1)/2
    basis = state.get("core.features.layer0.hermite_conv.rotate_hermite.H")  # (n, k·u, k·u)
    upsampling = int(basis.shape[1]) // kernels[0] if basis is not None else 2
    if rest or any(k * (k + 1) // 2 != c.shape[0] for k, c in zip(kernels, coeffs, strict=True)):
        raise WeightsError(
            f"{source}: inconsistent RotationEquivariant2dCore shapes (hidden {hidden}, GRU {gru_in.shape})"
        )
    values = {
        "hidden_channels": hidden,
        "num_rotations": rotations,
        "layers": len(layers),
        "input_kernel": kernels[0],
        "hidden_kernel": kernels[1] if len(kernels) > 1 else kernels[0],
        "upsampling": upsampling,
        "gru_channels": int(gru_in.shape[0]),
        "gru_input_kernel": int(gru_in.shape[2]),
        "gru_rec_kernel": int(rec.shape[2]),
    }
    args = [x for k, v in values.items() for x in (k, str(v))]
    return args + _behavior_args(source, int(coeffs[0].shape[1]))


def _factorized_core_args(source: Path, state: Mapping[str, Tensor]) -> list[str]:
    layers = _layers(state, r"^core\.features\.layer(\d+)\.conv_spatial(?:_\d+)?\.weight$")
    spatial = [
        state[k]
        for i in layers
        for k in state
        if re.match(rf"^core\.features\.layer{i}\.conv_spatial(_\d+)?\.weight$", k)
    ]
    temporal = [
        state[k]
        for i in layers
        for k in state
        if re.match(rf"^core\.features\.layer{i}\.conv_temporal(_\d+)?\.weight$", k)
    ]
    if len(spatial) != len(layers) or len(temporal) != len(layers):
        raise WeightsError(f"{source}: Factorized3dCore layers without a spatial and a temporal convolution each")
    values = {
        "hidden_channels": json.dumps([int(w.shape[0]) for w in spatial]),  # (out, in, 1, k, k)
        "spatial_input_kernel": int(spatial[0].shape[-1]),
        "temporal_input_kernel": int(temporal[0].shape[2]),  # (out, out, k, 1, 1)
        "spatial_hidden_kernel": int(spatial[-1].shape[-1]),
        "temporal_hidden_kernel": int(temporal[-1].shape[2]),
    }
    args = [x for k, v in values.items() for x in (k, str(v))]
    return args + _behavior_args(source, int(spatial[0].shape[1]))


def read(path: Path, architecture: str) -> OriginalWeights:
    """Read a starter-kit ``state_dict`` file of the ``gru`` or ``factorized`` baseline."""
    if architecture not in _SIGNATURES:
        raise ValueError(f"the starter kit trains gru and factorized, not {architecture!r}")
    state = state_dict_of(load_torch_file(path), path, "the starter kit's model.state_dict()")
    if _SIGNATURES[architecture] not in state:
        others = [a for a, key in _SIGNATURES.items() if key in state]
        what = f"the {others[0]} baseline's" if others else "no starter-kit baseline's"
        raise WeightsError(
            f"{path}: not a {architecture} baseline state dict (no {_SIGNATURES[architecture]}); it is {what}"
        )
    mice = sorted({m.group(1) for k in state if (m := _READOUT.match(k))})
    if not mice:
        raise WeightsError(f"{path}: no readout.<data_key>.* entries")
    mapped: dict[str, Tensor] = {}
    key_map = KEY_MAPS[architecture]
    for name, value in state.items():
        ours = key_map(name)
        if ours is None:
            continue
        if not ours.startswith(("core.", "readouts.", "shifters.")) or ours == name:
            raise WeightsError(f"{path}: unknown entry {name!r} for the {architecture} baseline")
        mapped[f"encoder.{ours}"] = value
    core = _gru_core_args(path, state) if architecture == "gru" else _factorized_core_args(path, state)
    args = [x for i in range(0, len(core), 2) for x in (f"--model.core.init_args.{core[i]}", core[i + 1])]
    args += _head_args(path, state, mice[0])
    return OriginalWeights(
        source=path,
        architecture=architecture,
        config_args=tuple(args),
        state_dict=mapped,
        neurons={
            m: int(state[f"readout.{m}.bias"].shape[0])
            if f"readout.{m}.bias" in state
            else int(state[f"readout.{m}.sigma"].shape[1])
            for m in mice
        },
        mouse_ids={m: m for m in mice},
    )
