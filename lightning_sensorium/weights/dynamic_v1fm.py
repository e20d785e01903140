"""Dynamic-V1FM's checkpoints: a ``train.py`` run's ``epoch_<n>.pth`` or a published ``model_<mode>.pth``.

https://github.com/zhuyu-cs/Dynamic-VFM trains one ``VideoFiringRateEncoder`` per (fusion, levels): its mmcv runner
saves ``{"meta", "state_dict", "optimizer"}`` in ``<work_dir>_<mean|adaptive>_<mode>/``; the published weights are
the state dicts its ``submission_func/*.py`` load into a ``DataParallel`` model
(``pretrained_weights_<mean|adaptive>/model_<mode>.pth``). Only these names say which levels ``mode`` fuses. Sizes
come from the tensor shapes; a config beside the file (``config/neuroencoding.py``) is checked against them. Mice
are keyed by session folder names (our ``mouse_id``\\ s). The one home of the name mapping (bench_swin3d_forward.py).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_sensorium.models.cores.swin3d import relative_position_index
from lightning_sensorium.weights import OriginalWeights, WeightsError, first_rename, load_torch_file, state_dict_of

#: original → our Encoder parameter names (regular expressions, the first match wins); per-mouse keys kept.
RENAMES = [
    (r"^core\.patch_embedding\.proj\.", "core.patch_embedding."),
    (r"^core\.patch_embedding\.norm\.", "core.norm."),
    (r"^core\.transformer\.blocks\.(\d+)\.mha\.", r"core.blocks.\1.attention."),
    (r"^core\.transformer\.blocks\.(\d+)\.mlp\.linear1\.0\.", r"core.blocks.\1.mlp.linear1."),
    (r"^core\.transformer\.blocks\.(\d+)\.mlp\.dwconv\.0\.conv\.", r"core.blocks.\1.mlp.dwconv."),
    (r"^core\.transformer\.blocks\.(\d+)\.mlp\.linear2\.0\.", r"core.blocks.\1.mlp.linear2."),
    (r"^core\.transformer\.blocks\.(\d+)\.b-mlp\.model\.", r"core.blocks.\1.behavior_mlp.mlp."),
    (r"^readout\.([^.]+)\._features(\d+)$", r"readouts.\1.level_features.\2"),
    (r"^readout\.([^.]+)\._features$", r"readouts.\1.features"),
    (r"^readout\.([^.]+)\.mu_transform\.", r"readouts.\1.grid_predictor."),
    (r"^readout\.([^.]+)\.up_refine(\d+)\.", r"readouts.\1.refinements.\2."),
    (r"^readout\.([^.]+)\.fusion_block(\d+)\.module\.", r"readouts.\1.fusions.\2.mlp."),
    (r"^readout\.([^.]+)\.(sigma|bias|source_grid)$", r"readouts.\1.\2"),
    (r"^shifter\.([^.]+)\.mlp\.", r"shifters.\1.mlp."),
]
_RENAMES = [(re.compile(pattern), new) for pattern, new in RENAMES]
#: Buffers of the original that are settings, not weights: checked by :func:`read`, then dropped.
_SETTINGS = re.compile(r"(\.relative_position_index|\.drop_path\.keep_prop)$")
#: The levels the original fuses in ``infer_mode``; ``0``: none (the plain Gaussian readout).
LEVELS = (2, 4, 8, 16)
_RUN_DIR = re.compile(r"_(mean|adaptive)_(0|(?:\d+_)*\d+)$")
_PUBLISHED = re.compile(r"^model_(0|(?:\d+_)*\d+)$")
_PUBLISHED_DIR = re.compile(r"(mean|adaptive)$")
#: config/neuroencoding.py's names (top level, model_dict, core_dict): the ones a config beside the file may hold.
CONFIG_KEYS = frozenset(
    [
        "model",
        "seed",
        "model_dict",
        "include_include_behavior_as_channels",
        "include_pupil_centers_as_channels",
        "video_enhance",
        "detach_core",
        "scale_loss",
        "loss_type",
        "data_root",
        "batch_size",
        "frames",
        "optimizer",
        "optimizer_config",
        "lr_config",
        "gpus",
        "dist_params",
        "data_workers",
        "checkpoint_config",
        "workflow",
        "total_epochs",
        "resume_from",
        "load_from",
        "work_dir",
        "log_level",
        "log_config",
    ]
)
CORE_DICT_KEYS = frozenset(
    {"in_channels", "behavior_dim", "patch_size", "window_size", "emb_dim", "num_blocks", "num_heads", "mlp_dim"}
    | {"t_dropout", "drop_path", "bias", "grad_checkpointing"}
)
MODEL_DICT_KEYS = frozenset(
    [
        "core_dict",
        "core_type",
        "readout_dict",
        "readout_type",
        "use_shifter",
        "shifter_dict",
        "shifter_type",
        "deeplake_ds",
    ]
)


def encoder_key(name: str) -> str | None:
    """Our :class:`~lightning_sensorium.models.Encoder` name of an original ``VideoFiringRateEncoder`` entry."""
    return first_rename(name, _RENAMES)


def translate(state: Mapping[str, Tensor], source: Path) -> dict[str, Tensor]:
    """An original state dict (``module.`` removed) → SensoriumModule keys; its setting buffers dropped."""
    out: dict[str, Tensor] = {}
    unknown = []
    for name, value in state.items():
        if _SETTINGS.search(name):
            continue
        key = encoder_key(name)
        if key is None:
            unknown.append(name)
        else:
            out[f"encoder.{key}"] = value
    if unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise WeightsError(f"{source}: not a Dynamic-V1FM model: entries {unknown[:5]}{more}")
    return out


def levels_of(path: Path) -> tuple[str | None, tuple[int, ...]]:
    """``(fusion or None, levels)`` from the file's name (``model_<mode>.pth``) or its run directory's."""
    mode, fusion = None, None
    if m := _PUBLISHED.match(path.stem):
        mode = m.group(1)
        if f := _PUBLISHED_DIR.search(path.parent.name):
            fusion = f.group(1)
    elif m := _RUN_DIR.search(path.parent.name):
        fusion, mode = m.groups()
    if mode is None:
        raise WeightsError(
            f"{path}: cannot tell the fused levels: Dynamic-V1FM names them only in the file name "
            "(pretrained_weights_<fusion>/model_<mode>.pth) or the run directory (<work_dir>_<fusion>_<mode>/); "
            "keep that name"
        )
    levels = () if mode == "0" else tuple(int(k) for k in mode.split("_"))
    if any(k not in LEVELS for k in levels) or len(set(levels)) != len(levels):
        raise WeightsError(f"{path}: mode {mode!r}: levels must be distinct values of {LEVELS} (or 0)")
    return fusion, levels


def window_of(index: Tensor, table_rows: int, source: Path) -> tuple[int, int, int]:
    """The (T, H, W) attention window whose relative-position index is ``index`` ``(V, V)``."""
    volume = index.shape[0]
    triples = ((t, h, volume // (t * h)) for t in range(1, volume + 1) for h in range(1, volume // t + 1))
    for window in (w for w in triples if w[0] * w[1] * w[2] == volume):
        if (2 * window[0] - 1) * (2 * window[1] - 1) * (2 * window[2] - 1) != table_rows:
            continue
        if torch.equal(relative_position_index(window).to(index.dtype), index):
            return window
    raise WeightsError(f"{source}: relative_position_index {tuple(index.shape)} matches no 3D attention window")


def sizes_of(state: Mapping[str, Tensor], source: Path) -> dict[str, Any]:
    """The core's, readout's and shifter's sizes read from the tensor shapes."""
    try:
        proj = state["core.patch_embedding.proj.weight"]  # (C, in, pt, ph, pw)
        blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"core\.transformer\.blocks\.(\d+)\.", k))})
        block = "core.transformer.blocks.0."
        table = state[block + "mha.relative_position_bias_table"]  # (rows, heads)
        index = state[block + "mha.relative_position_index"]  # (V, V)
        behavior = state[block + "b-mlp.model.0.weight"]  # (hidden, 4)
        mlp_hidden = state[block + "mlp.linear2.0.weight"].shape[1]
        mouse = next(m.group(1) for k in state if (m := re.match(r"readout\.([^.]+)\.sigma$", k)))
        grid_hidden = state[f"readout.{mouse}.mu_transform.0.weight"].shape[0]
        refine = state[f"readout.{mouse}.up_refine2.0.weight"].shape[0] // 2
        shifter_layers = [k for k in state if re.match(rf"shifter\.{re.escape(mouse)}\.mlp\.\d+\.weight$", k)]
        shifter_hidden = state[f"shifter.{mouse}.mlp.0.weight"].shape[0]
    except (KeyError, StopIteration) as e:
        raise WeightsError(f"{source}: not a Dynamic-V1FM model (no {e})") from e
    keep = state.get("core.transformer.drop_path.keep_prop")
    return {
        "core": {
            "embed_dim": int(proj.shape[0]),
            "video_channels": int(proj.shape[1]),
            "patch_size": [int(s) for s in proj.shape[2:]],
            "num_blocks": len(blocks),
            "num_heads": int(table.shape[1]),
            "window_size": list(window_of(index, int(table.shape[0]), source)),
            "mlp_hidden": int(mlp_hidden),
            "behavior_hidden": int(behavior.shape[0]),
            "qkv_bias": block + "mha.qkv.bias" in state,
            "proj_bias": block + "mha.proj.bias" in state,
            "drop_path": round(1.0 - float(keep), 6) if keep is not None else 0.0,
        },
        "readout": {"grid_hidden_features": int(grid_hidden), "refine_width": int(refine)},
        "shifter": {"hidden_channels": int(shifter_hidden), "layers": len(shifter_layers)},
    }


def _literal(node: ast.expr) -> Any:
    """A config value: literals, ``dict(key=…)`` and arithmetic on numbers (``1.0 / 3``), nothing else."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return {kw.arg: _literal(kw.value) for kw in node.keywords}
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values, strict=True) if k is not None}
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        left, right = _literal(node.left), _literal(node.right)
        ops = {ast.Add: float.__add__, ast.Sub: float.__sub__, ast.Mult: float.__mul__, ast.Div: float.__truediv__}
        return ops[type(node.op)](float(left), float(right))
    return ast.literal_eval(node)


def read_config(path: Path, sizes: dict[str, Any]) -> dict[str, Any]:
    """A ``config/neuroencoding.py`` beside the checkpoint: literal assignments only (never executed); every name
    must be one of the original's and its ``model_dict`` must describe the file's model. Returns the core options
    the state does not record (``t_dropout``)."""
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
        config = {
            t.id: _literal(node.value)
            for node in tree.body
            if isinstance(node, ast.Assign)
            for t in node.targets
            if isinstance(t, ast.Name)
        }
    except (SyntaxError, ValueError, TypeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not a Dynamic-V1FM config of literal assignments: {e}") from e
    unknown = sorted(set(config) - CONFIG_KEYS)
    model = config.get("model_dict", {})
    unknown += sorted(f"model_dict.{k}" for k in set(model) - MODEL_DICT_KEYS)
    unknown += sorted(f"model_dict.core_dict.{k}" for k in set(model.get("core_dict", {})) - CORE_DICT_KEYS)
    if unknown:
        raise WeightsError(f"{path}: unknown Dynamic-V1FM config key(s) {unknown}: not in config/neuroencoding.py")
    core = model.get("core_dict", {})
    expected = {
        "emb_dim": sizes["core"]["embed_dim"],
        "in_channels": sizes["core"]["video_channels"],
        "patch_size": sizes["core"]["patch_size"],
        "window_size": sizes["core"]["window_size"],
        "num_blocks": sizes["core"]["num_blocks"],
        "num_heads": sizes["core"]["num_heads"],
        "mlp_dim": sizes["core"]["mlp_hidden"],
        "behavior_dim": 4,
    }
    for key, value in expected.items():
        got = core.get(key, value)
        if (list(got) if isinstance(got, (list, tuple)) else got) != value:
            raise WeightsError(f"{path}: model_dict.core_dict.{key} = {core[key]!r}, the checkpoint has {value!r}")
    for key, value in {"core_type": "Swin3D", "readout_type": "gaussian", "shifter_type": "MLP"}.items():
        if model.get(key, value) != value:
            raise WeightsError(f"{path}: model_dict.{key} = {model[key]!r}, expected {value!r}")
    return {"dropout": float(core.get("t_dropout", 0.0))}


def read(path: Path) -> OriginalWeights:
    """A Dynamic-V1FM checkpoint (runner or published layout) → :class:`OriginalWeights`."""
    path = Path(path)
    checkpoint = load_torch_file(path)
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint and "meta" in checkpoint:
        state = state_dict_of(checkpoint["state_dict"], path, "the runner's state_dict")
    elif isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, Tensor) for v in checkpoint.values()):
        state = state_dict_of(checkpoint, path, "a state dict")
    else:
        keys = sorted(map(str, checkpoint))[:6] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise WeightsError(
            f"{path}: not a Dynamic-V1FM checkpoint (a runner file with 'meta' and 'state_dict', or a state dict; "
            f"found {keys})"
        )
    if all(k.startswith("module.") for k in state):  # DataParallel's (the published files)
        state = {k[len("module.") :]: v for k, v in state.items()}
    translated = translate(state, path)
    sizes = sizes_of(state, path)
    fusion, levels = levels_of(path)
    adaptive = any(".fusion_block" in k for k in state)
    if fusion is not None and (fusion == "adaptive") != adaptive:
        raise WeightsError(
            f"{path}: the name says {fusion} fusion but the readouts {'have' if adaptive else 'lack'} fusion blocks"
        )
    configs = sorted(path.parent.glob("*.py"))
    if len(configs) > 1:
        raise WeightsError(f"{path}: which config is its? several beside it: {[c.name for c in configs]}")
    extra = read_config(configs[0], sizes) if configs else {"dropout": 0.0}
    mice = [m.group(1) for k in state if (m := re.match(r"readout\.([^.]+)\.sigma$", k))]  # readout order
    core = {**sizes["core"], **extra}
    args = [f"--model.core.init_args.{k}={json.dumps(v)}" for k, v in core.items()]
    readout = {"levels": list(levels), "fusion": "adaptive" if adaptive else "mean", **sizes["readout"]}
    args += [f"--model.readout.init_args.{k}={json.dumps(v) if k != 'fusion' else v}" for k, v in readout.items()]
    args += [f"--model.shifter.init_args.{k}={v}" for k, v in sizes["shifter"].items()]
    return OriginalWeights(
        source=path,
        architecture="dynamic_v1fm",
        config_args=tuple(args),
        state_dict=translated,
        neurons={mouse: int(state[f"readout.{mouse}.sigma"].shape[1]) for mouse in mice},
        mouse_ids={mouse: mouse for mouse in mice},
    )


__all__ = ["RENAMES", "encoder_key", "read", "translate"]
