"""DwiseNeuro (1st place, https://github.com/lRomul/sensorium): the argus model files its training writes.

Each file is what ``argus.Model.save`` and the EMA copy's ``EmaCheckpoint.save_model`` (``src/ema.py``) write,
``data/experiments/<experiment>/fold_<k>/model-<epoch>-<score>.pth`` (the published 7 folds × 2 stages are EMA
files): ``{"model_name": "MouseModel", "params": {...}, "nn_state_dict": DwiseNeuro.state_dict()}``, the same layout
``argus.load_model`` reads. The architecture comes from the file's own ``params["nn_module"]``; the readouts are
indexed by ``src/constants.py``'s ``mice`` order, whose session names are our ``mouse_id``\\ s. The core's key
mapping is :func:`lightning_sensorium.models.cores.dwiseneuro.original_key` (one home, shared with the parity
benchmark).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_sensorium.models.cores.dwiseneuro import DwiseNeuroCore, original_key
from lightning_sensorium.weights import OriginalWeights, WeightsError, load_torch_file, state_dict_of

#: ``src/constants.py``: readout ``i`` predicts mouse ``MICE[i]`` (the 5 new mice, then the 5 old ones).
MICE = (
    "dynamic29515-10-12-Video-9b4f6a1a067fe51e15306b9628efea20",
    "dynamic29623-4-9-Video-9b4f6a1a067fe51e15306b9628efea20",
    "dynamic29647-19-8-Video-9b4f6a1a067fe51e15306b9628efea20",
    "dynamic29712-5-9-Video-9b4f6a1a067fe51e15306b9628efea20",
    "dynamic29755-2-8-Video-9b4f6a1a067fe51e15306b9628efea20",
    "dynamic29156-11-10-Video-8744edeac3b4d1ce16b680916b5267ce",
    "dynamic29228-2-10-Video-8744edeac3b4d1ce16b680916b5267ce",
    "dynamic29234-6-9-Video-8744edeac3b4d1ce16b680916b5267ce",
    "dynamic29513-3-5-Video-8744edeac3b4d1ce16b680916b5267ce",
    "dynamic29514-2-9-Video-8744edeac3b4d1ce16b680916b5267ce",
)

#: ``DwiseNeuro.__init__``'s arguments → our core's (None: read elsewhere or irrelevant to the weights).
_NN_MODULE_ARGS = {
    "readout_outputs": None,
    "in_channels": None,
    "core_features": "features",
    "spatial_strides": "spatial_strides",
    "spatial_kernel": "spatial_kernel",
    "temporal_kernel": "temporal_kernel",
    "expansion_ratio": "expansion",
    "se_reduce_ratio": "se_reduction",
    "cortex_features": "cortex_features",
    "groups": "groups",
    "drop_path_rate": "drop_path",
    "softplus_beta": None,
    "drop_rate": None,
}
#: ``DwiseNeuro.__init__``'s defaults for the arguments a config may leave out.
_DEFAULTS: dict[str, Any] = {
    "in_channels": 5,
    "core_features": (64, 64, 64, 64, 128, 128, 128, 256, 256),
    "spatial_strides": (2, 1, 1, 1, 2, 1, 1, 2, 1),
    "spatial_kernel": 3,
    "temporal_kernel": 5,
    "expansion_ratio": 6,
    "se_reduce_ratio": 32,
    "cortex_features": (1024, 2048, 4096),
    "groups": 2,
    "softplus_beta": 0.07,
    "drop_rate": 0.4,
    "drop_path_rate": 0.1,
}
#: The ``argus_params`` keys of configs/true_batch_001.py and distillation_001.py (argus adds none).
_PARAMS = {
    "nn_module", "loss", "optimizer", "device", "frame_stack", "inputs_processor", "responses_processor", "amp",
    "iter_size", "prediction_transform",
}  # fmt: skip
_CONSTANT = re.compile(r"^core\.blocks\.\d+\.inv_freq$")  # PositionalEncoding3d's frequencies: computed in ours
_READOUT = re.compile(r"^readouts\.(\d+)\.layer\.1\.(weight|bias)$")


def _params(path: Path, checkpoint: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The argus params and the ``DwiseNeuro`` arguments (defaults filled in), checked."""
    if not isinstance(checkpoint, dict) or not {"model_name", "params", "nn_state_dict"} <= set(checkpoint):
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise WeightsError(f"{path}: not an argus model file (model_name, params, nn_state_dict); found {found}")
    params = checkpoint["params"]
    nn_module = params.get("nn_module") if isinstance(params, dict) else None
    if not isinstance(nn_module, list | tuple) or len(nn_module) != 2 or nn_module[0] != "dwiseneuro":
        raise WeightsError(f"{path}: params.nn_module is {nn_module!r}, not ('dwiseneuro', {{...}}): not DwiseNeuro")
    unknown = sorted(set(params) - _PARAMS) + sorted(f"nn_module.{k}" for k in set(nn_module[1]) - set(_NN_MODULE_ARGS))
    if unknown:
        raise WeightsError(f"{path}: unknown DwiseNeuro config keys {unknown} (lRomul/sensorium's configs have none)")
    args = {**_DEFAULTS, **nn_module[1]}
    if args["in_channels"] != 5:
        raise WeightsError(f"{path}: nn_module.in_channels={args['in_channels']}; ours reads DwiseNeuro's 5 channels")
    return params, args


def _config_args(path: Path, params: Mapping[str, Any], args: Mapping[str, Any]) -> list[str]:
    core = {ours: args[theirs] for theirs, ours in _NN_MODULE_ARGS.items() if ours is not None}
    size = params.get("inputs_processor", ("stack_inputs", {"size": (64, 64)}))[1].get("size", (64, 64))
    core["pad_to"] = [size[1], size[0]]  # StackInputsProcessor's size is (width, height)
    out = [
        x
        for k, v in core.items()
        for x in (f"--model.core.init_args.{k}", json.dumps(list(v) if isinstance(v, tuple) else v))
    ]
    out += ["--model.readout.init_args.groups", json.dumps(args["groups"])]
    out += ["--model.readout.init_args.dropout", json.dumps(args["drop_rate"])]
    out += ["--model.output_activation.init_args.beta", json.dumps(args["softplus_beta"])]
    stack = params.get("frame_stack", {"size": 16, "step": 2, "position": "last"})
    if stack.get("position") != "last":
        raise WeightsError(f"{path}: params.frame_stack.position={stack.get('position')!r}; its predictor needs 'last'")
    return [*out, "--data.frames", str(stack["size"]), "--data.frame_step", str(stack["step"])]


def read(path: Path) -> OriginalWeights:
    """Read one argus model file of DwiseNeuro (raw or EMA weights: the same layout)."""
    path = Path(path)
    checkpoint = load_torch_file(path)
    params, args = _params(path, checkpoint)
    state = state_dict_of(checkpoint["nn_state_dict"], path, "the nn_state_dict of DwiseNeuro")
    with torch.device("meta"):  # only the key names: no memory, no initialisation
        core = DwiseNeuroCore(**{ours: args[theirs] for theirs, ours in _NN_MODULE_ARGS.items() if ours is not None})
    mapped: dict[str, Tensor] = {}
    for name in core.state_dict():
        theirs = original_key(name)
        if theirs not in state:
            raise WeightsError(f"{path}: no {theirs} for the configured DwiseNeuro (another size, or another model)")
        mapped[f"encoder.core.{name}"] = state[theirs]
    used = {original_key(name) for name in core.state_dict()}
    outputs = [int(n) for n in args.get("readout_outputs") or ()]
    for name, value in state.items():
        if name in used or _CONSTANT.match(name):
            continue
        if not (m := _READOUT.match(name)) or int(m.group(1)) >= len(outputs):
            raise WeightsError(f"{path}: unknown entry {name!r} for DwiseNeuro")
        mapped[f"encoder.readouts.{m.group(1)}.conv.{m.group(2)}"] = value
    if len(outputs) > len(MICE):
        raise WeightsError(f"{path}: {len(outputs)} readouts, but lRomul/sensorium knows {len(MICE)} mice")
    for i, n in enumerate(outputs):
        rows = state.get(f"readouts.{i}.layer.1.weight")
        if rows is None or rows.shape[0] != math.ceil(n / args["groups"]) * args["groups"]:
            raise WeightsError(f"{path}: readout {i} does not predict readout_outputs[{i}]={n} neurons")
    return OriginalWeights(
        source=path,
        architecture="dwiseneuro",
        config_args=tuple(_config_args(path, params, args)),
        state_dict=mapped,
        neurons={str(i): n for i, n in enumerate(outputs)},
        mouse_ids={str(i): MICE[i] for i in range(len(outputs))},
    )
