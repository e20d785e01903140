"""ViV1T's runs: ``<run>/ckpt/model_state.pt`` with the run's ``<run>/args.yaml``.

https://github.com/bryanlimy/ViV1T writes a run directory: ``train.py`` saves its arguments with
``utils.save_args`` (``args.yaml``) and ``src/viv1t/scheduler.py`` ``Scheduler.save_checkpoint`` the checkpoint
``{"epoch", "value", "model": Model.state_dict(), "optimizer", "scheduler"}``; the five submission runs
(``runs/viv1t_00{1..5}``, https://huggingface.co/bryanlimy/ViV1T) import as one ensemble. The arguments give the
sizes; the model's mice are letters ``A``–``J`` (``src/viv1t/data/constants.py``). Supported: the README
command's model (``--core=vivit --core_parallel_attention --readout=gaussian2d``, shifter on the pupil centre, no
modulator) at any size; any other value of an argument that shapes the model is refused, naming it. The name
mapping here is the one home of it (``benchmarks/bench_vivit_forward.py`` uses it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from torch import Tensor

from lightning_sensorium.weights import OriginalWeights, WeightsError, first_rename, load_torch_file, state_dict_of

#: ViV1T's mouse letters → session folder names (our mouse_ids): MOUSE_IDS of
#: https://github.com/bryanlimy/ViV1T/blob/main/src/viv1t/data/constants.py
MOUSE_IDS = {
    "A": "dynamic29156-11-10-Video-8744edeac3b4d1ce16b680916b5267ce",
    "B": "dynamic29228-2-10-Video-8744edeac3b4d1ce16b680916b5267ce",
    "C": "dynamic29234-6-9-Video-8744edeac3b4d1ce16b680916b5267ce",
    "D": "dynamic29513-3-5-Video-8744edeac3b4d1ce16b680916b5267ce",
    "E": "dynamic29514-2-9-Video-8744edeac3b4d1ce16b680916b5267ce",
    "F": "dynamic29515-10-12-Video-9b4f6a1a067fe51e15306b9628efea20",
    "G": "dynamic29623-4-9-Video-9b4f6a1a067fe51e15306b9628efea20",
    "H": "dynamic29647-19-8-Video-9b4f6a1a067fe51e15306b9628efea20",
    "I": "dynamic29712-5-9-Video-9b4f6a1a067fe51e15306b9628efea20",
    "J": "dynamic29755-2-8-Video-9b4f6a1a067fe51e15306b9628efea20",
}

#: Arguments whose value must be this for our port to be the original's model (the README command's).
REQUIRED = {
    "core": "vivit",
    "readout": "gaussian2d",
    "shifter_mode": 1,
    "modulator_mode": 0,
    "core_patch_mode": 0,
    "core_pos_encoding": 3,
    "core_temporal_patch_stride": 1,
    "core_ff_activation": "gelu",
    "core_norm_qk": False,
    "core_parallel_attention": True,
    "readout_grid_mode": 1,
    "center_crop": 1.0,
}
#: What an older args.yaml without the key means (train.py's default, or ViViT.__init__'s).
ABSENT: dict[str, Any] = {"center_crop": 1.0, "core_norm_qk": False, "core_parallel_attention": False}
#: Every argument train.py defines (any core, readout, modulator or critic), plus what it sets before save_args.
KNOWN = frozenset(
    [
        "adam_beta1",
        "adam_beta2",
        "adam_eps",
        "batch_size",
        "cache_data",
        "center_crop",
        "clear_output_dir",
        "core",
        "core_behavior_mode",
        "core_compile",
        "core_drop_path",
        "core_dropout",
        "core_emb_dim",
        "core_ff_activation",
        "core_ff_dropout",
        "core_flash_attention",
        "core_head_dim",
        "core_hidden_dim",
        "core_lr",
        "core_mha_dropout",
        "core_mlp_dim",
        "core_norm_qk",
        "core_num_heads",
        "core_num_layers",
        "core_p_dropout",
        "core_parallel_attention",
        "core_patch_mode",
        "core_pos_encoding",
        "core_spatial_depth",
        "core_spatial_hidden_kernel",
        "core_spatial_input_kernel",
        "core_spatial_patch_size",
        "core_spatial_patch_stride",
        "core_temporal_depth",
        "core_temporal_hidden_kernel",
        "core_temporal_input_kernel",
        "core_temporal_patch_size",
        "core_temporal_patch_stride",
        "core_weight_decay",
        "criterion",
        "critic_dropout",
        "critic_hidden_dim",
        "critic_mode",
        "critic_weight_decay",
        "crop_frame",
        "data",
        "deterministic",
        "device",
        "dpi",
        "ds_mode",
        "ds_scale",
        "epochs",
        "format",
        "grad_checkpointing",
        "grad_norm",
        "limit_data",
        "lr",
        "micro_batch_size",
        "modulator_activation",
        "modulator_behaviors_dropout",
        "modulator_dropout",
        "modulator_hidden_dim",
        "modulator_history_dropout",
        "modulator_history_size",
        "modulator_include_behaviors",
        "modulator_include_history",
        "modulator_mode",
        "modulator_weight_decay",
        "mouse_ids",
        "num_workers",
        "output_dir",
        "output_mode",
        "precision",
        "pretrain_core",
        "readout",
        "readout_bias_mode",
        "readout_dropout",
        "readout_grid_mode",
        "restore",
        "save_plots",
        "seed",
        "shifter_layers",
        "shifter_mode",
        "shifter_size",
        "stat_mode",
        "transform_mode",
        "verbose",
        "wandb",
        "wandb_id",
        "weight_decay",
        "input_shapes",
        "output_shapes",
        "max_frame",
        "trainable_params",
        "use_wandb",
        "git_hash",
        "hostname",
    ]
)
#: The arguments that size the model (config_args reads them).
NEEDED = frozenset(
    {"core_emb_dim", "core_num_heads", "core_head_dim", "core_mlp_dim", "core_spatial_depth", "core_temporal_depth"}
    | {"core_spatial_patch_size", "core_spatial_patch_stride", "core_temporal_patch_size", "core_p_dropout"}
    | {"core_mha_dropout", "core_drop_path", "core_behavior_mode", "max_frame", "input_shapes", "output_shapes"}
    | {"readout_bias_mode", "shifter_size", "shifter_layers", "output_mode"}
)
#: output_mode → our output activation (Model.__init__ of src/viv1t/model/model.py).
ACTIVATIONS = {
    0: "lightning_sensorium.models.layers.ELU1",
    1: "lightning_sensorium.models.layers.Exp",
    2: "torch.nn.Softplus",
}

_CORE = "core.vivit."
_CORE_RENAMES = [
    (re.compile(r"^tokenizer\.spatial_pos_embedding$"), "tokenizer.spatial_pos"),
    (re.compile(r"^tokenizer\.temporal_pos_embedding$"), "tokenizer.temporal_pos"),
    (re.compile(r"^tokenizer\.tokenizer\.1\."), "tokenizer.norm_in."),
    (re.compile(r"^tokenizer\.tokenizer\.2\."), "tokenizer.proj."),
    (re.compile(r"^tokenizer\.tokenizer\.3\."), "tokenizer.norm_out."),
    (
        re.compile(r"^(spatial|temporal)_transformer\.blocks\.(\d+)\.((norm|fused_linear|attn_out|ff_out\.2)\..+)$"),
        r"\1_transformer.\2.\3",
    ),
]
_READOUT = re.compile(r"^readouts\.([^.]+)\.(.+)$")
_SHIFTER = re.compile(r"^shifters\.([^.]+)\.(mlp\..+)$")
#: The original's buffers that are settings, not weights (checked or dropped): regulariser scales, attention scale,
#: DropPath keep probabilities.
_SETTINGS = re.compile(r"(^|\.)(reg_scale|scale|keep_prob)$")


def core_key(name: str) -> str | None:
    """Our ``ViViTCore`` name of an entry of the original's ``ViViT`` (its name after ``core.vivit.``); None if
    ours has no such entry."""
    return first_rename(name, _CORE_RENAMES)


def translate(state: Mapping[str, Tensor], head_dim: int, source: Path) -> dict[str, Tensor]:
    """An original ``Model.state_dict()`` → SensoriumModule keys (per-mouse parts under the original's letters).

    The readout's feature weights ``(1, C, N)`` become ours ``(1, C, 1, N)``; its grid MLP is ``grid_predictor``.
    The attention scale buffers must equal ``head_dim ** -0.5`` (our blocks compute it).
    """
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for name, value in state.items():
        if _SETTINGS.search(name):
            if name.endswith(".scale") and not math.isclose(float(value), head_dim**-0.5, rel_tol=1e-6):
                raise WeightsError(f"{source}: {name} = {float(value)}, expected head_dim ** -0.5 = {head_dim**-0.5}")
            continue
        if name.startswith(_CORE) and (key := core_key(name[len(_CORE) :])) is not None:
            out[f"encoder.core.{key}"] = value
        elif m := _READOUT.match(name):
            mouse, rest = m.groups()
            if rest == "features":
                value = value.reshape(value.shape[0], value.shape[1], 1, value.shape[2])  # (1, C, N) → (1, C, 1, N)
            out[f"encoder.readouts.{mouse}.{rest.replace('mu_transform.', 'grid_predictor.')}"] = value
        elif m := _SHIFTER.match(name):
            out[f"encoder.shifters.{m.group(1)}.{m.group(2)}"] = value
        else:
            unknown.append(name)
    if unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise WeightsError(f"{source}: entries the ViV1T model of args.yaml does not have: {unknown[:5]}{more}")
    return out


def config_args(args: Mapping[str, Any]) -> tuple[str, ...]:
    """LightningCLI arguments over ``experiments/viv1t.yaml`` that rebuild the run's model."""
    behavior_mode = int(args["core_behavior_mode"])
    core = {
        "dim": args["core_emb_dim"],
        "heads": args["core_num_heads"],
        "head_dim": args["core_head_dim"],
        "ff_dim": args["core_mlp_dim"],
        "spatial_depth": args["core_spatial_depth"],
        "temporal_depth": args["core_temporal_depth"],
        "spatial_patch": args["core_spatial_patch_size"],
        "spatial_stride": args["core_spatial_patch_stride"],
        "temporal_patch": args["core_temporal_patch_size"],
        "patch_dropout": args["core_p_dropout"],
        "attention_dropout": args["core_mha_dropout"],
        # ViViT.__init__: no --core_ff_dropout means the attention's
        "ff_dropout": args["core_mha_dropout"] if args.get("core_ff_dropout") is None else args["core_ff_dropout"],
        "drop_path": args["core_drop_path"],
        "max_frames": args["max_frame"],
        "video_channels": args["input_shapes"]["video"][0],
        "behavior_channels": behavior_mode in (1, 2),
        "pupil_channels": behavior_mode == 2,
    }
    out = [f"--model.core.init_args.{k}={_value(v)}" for k, v in core.items()]
    out += [
        f"--model.readout.init_args.bias={_value(int(args['readout_bias_mode']) != 0)}",
        f"--model.readout.init_args.state_dropout={_value(args.get('readout_dropout', 0.0))}",
        f"--model.shifter.init_args.hidden_channels={_value(args['shifter_size'])}",
        f"--model.shifter.init_args.layers={_value(args['shifter_layers'])}",
        f"--model.output_activation={ACTIVATIONS[int(args['output_mode'])]}",
    ]
    return tuple(out)


def _value(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _load_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise WeightsError(f"{path}: missing: a ViV1T checkpoint needs its run's args.yaml (<run>/args.yaml)")
    try:
        args = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not readable YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(args, dict) or "core" not in args:
        raise WeightsError(f"{path}: not ViV1T's args.yaml (a mapping of train.py's arguments with `core`)")
    return args


def read_args(path: Path) -> dict[str, Any]:
    """``args.yaml`` as train.py saved it, checked: every key known, every model-shaping value supported."""
    args = _load_yaml(path)
    unknown = sorted(set(args) - KNOWN)
    if unknown:
        raise WeightsError(f"{path}: unknown ViV1T argument(s) {unknown}: not one of train.py's")
    if args["core"] != "vivit":
        raise WeightsError(f"{path}: core: {args['core']!r}, not a ViV1T run (expected core: vivit)")
    for key, value in REQUIRED.items():
        got = args.get(key, ABSENT.get(key))
        if got != value:
            raise WeightsError(f"{path}: {key}: {got!r} is not supported (the README model has {value!r})")
    missing = sorted(NEEDED - set(args))
    if missing:
        raise WeightsError(f"{path}: no {missing}: train.py's args.yaml has them (its model's sizes)")
    choices = {"core_behavior_mode": (0, 1, 2), "output_mode": tuple(ACTIVATIONS), "shifter_layers": range(1, 99)}
    for key, allowed in choices.items():
        if args[key] not in allowed:
            raise WeightsError(f"{path}: {key}: {args[key]!r} is not supported (expected one of {list(allowed)[:5]})")
    if not isinstance(args["output_shapes"], dict) or not isinstance(args["input_shapes"], dict):
        raise WeightsError(f"{path}: input_shapes / output_shapes are not mappings (train.py's set_shapes writes them)")
    return args


def run_files(path: Path) -> tuple[Path, Path]:
    """``(args.yaml, ckpt/model_state.pt)`` of a run directory or of its ``model_state.pt``."""
    path = Path(path)
    if path.is_dir():
        return path / "args.yaml", path / "ckpt" / "model_state.pt"
    return path.parent.parent / "args.yaml", path


def _numpy_scalars() -> list[Any]:
    """numpy scalars a ViV1T scheduler state may hold (its best correlation), allowed by ``torch.load``."""
    multiarray = getattr(np, "_core", None) or np.core
    return [multiarray.multiarray.scalar, np.dtype, np.dtypes.Float64DType, np.dtypes.Float32DType]


def read(path: Path) -> OriginalWeights:
    """A ViV1T run (its directory, or its ``ckpt/model_state.pt``) → :class:`OriginalWeights`."""
    args_file, ckpt_file = run_files(path)
    checkpoint = load_torch_file(ckpt_file, _numpy_scalars())
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        keys = sorted(checkpoint)[:6] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise WeightsError(
            f"{ckpt_file}: not a ViV1T checkpoint (Scheduler.save_checkpoint writes a dict with 'model'; found {keys})"
        )
    state = state_dict_of(checkpoint["model"], ckpt_file, "ViV1T's Model.state_dict()")
    args = read_args(args_file)
    mice = [str(m) for m in args.get("mouse_ids") or args["output_shapes"]]
    neurons: dict[str, int] = {}
    for mouse in mice:
        sigma = state.get(f"readouts.{mouse}.sigma")  # (1, N, 2, 2)
        if sigma is None:
            raise WeightsError(f"{ckpt_file}: no readout of mouse {mouse!r} that {args_file} lists in mouse_ids")
        neurons[mouse] = int(sigma.shape[1])
        shape = args["output_shapes"].get(mouse)
        if not shape or int(shape[0]) != neurons[mouse]:
            raise WeightsError(
                f"{ckpt_file}: mouse {mouse!r}: {neurons[mouse]} neurons in the readout, {args_file} output_shapes "
                f"says {shape}"
            )
    extra = sorted({m.group(1) for k in state if (m := _READOUT.match(k))} - set(mice))
    if extra:
        raise WeightsError(f"{ckpt_file}: readouts of mice {extra} that {args_file} does not list in mouse_ids")
    return OriginalWeights(
        source=ckpt_file,
        architecture="viv1t",
        config_args=config_args(args),
        state_dict=translate(state, int(args["core_head_dim"]), ckpt_file),
        neurons=neurons,
        mouse_ids={mouse: MOUSE_IDS.get(mouse, mouse) for mouse in mice},
    )


__all__ = ["MOUSE_IDS", "config_args", "core_key", "read", "translate"]
