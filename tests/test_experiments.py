"""Every experiments/*.yaml fits end to end on tiny synthetic mice (``fast_dev_run``), shrunk to seconds on CPU,
in float32 and under bf16 autocast (``bf16-mixed``, the mixed precision every model supports).

``SMOKE`` holds, per config, the overrides that make its model tiny (fewer channels, shorter windows); the recipe
itself (loss, optimiser, callbacks, data mode) is what the YAML says. Every config must have an entry.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_sensorium.cli import cli_args, lightning_main, with_defaults
from lightning_sensorium.demo import DEMO_OVERRIDES, demo_overrides, resolve_precision

EXPERIMENTS = Path(__file__).parents[1] / "experiments"
CONFIGS = sorted(p.name for p in EXPERIMENTS.glob("*.yaml") if p.name != "defaults.yaml")

#: config file → overrides (option → value) that shrink the model for a CPU smoke test; CORE = the core's init_args.
CORE = "model.core.init_args."
#: Both DwiseNeuro stages shrink the same way.
DWISENEURO = {
    CORE + "features": "[4, 8]",
    CORE + "spatial_strides": "[2, 2]",
    CORE + "expansion": "2",
    CORE + "se_reduction": "4",
    CORE + "cortex_features": "[8, 16]",
    "data.frames": "8",
    "model.eval_window": "8",
    "model.eval_stride": "7",
}
SMOKE: dict[str, dict[str, str]] = {
    "dwiseneuro.yaml": DWISENEURO,
    "dwiseneuro_distill.yaml": DWISENEURO,
    "dynamic_v1fm.yaml": {
        CORE + "embed_dim": "8",
        CORE + "num_heads": "2",
        CORE + "mlp_hidden": "4",
        CORE + "num_blocks": "2",
        CORE + "window_size": "[2, 3, 3]",
        "data.frames": "8",
        "model.eval_window": "8",
        "model.eval_stride": "4",
    },
    "factorized.yaml": {CORE + "hidden_channels": "[4, 4, 4]", "data.frames": "24"},
    "gru.yaml": {
        CORE + "hidden_channels": "2",
        CORE + "num_rotations": "4",
        CORE + "gru_channels": "4",
        "data.frames": "12",
    },
    "viv1t.yaml": {
        CORE + "dim": "8",
        CORE + "heads": "2",
        CORE + "head_dim": "4",
        CORE + "ff_dim": "8",
        CORE + "spatial_depth": "1",
        CORE + "temporal_depth": "1",
        CORE + "spatial_patch": "4",
        CORE + "spatial_stride": "4",
        CORE + "temporal_patch": "3",
        "data.frames": "30",
    },
}


def smoke_args(config: str) -> list[str]:
    """``SMOKE[config]`` as command-line arguments."""
    return cli_args(SMOKE.get(config, {}))


def test_every_config_has_a_smoke_entry() -> None:
    assert set(CONFIGS) <= set(SMOKE), f"add a SMOKE entry for {sorted(set(CONFIGS) - set(SMOKE))}"


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("config", CONFIGS)
def test_every_experiment_fits(config: str, precision: str, tiny_stores: Path, tmp_path: Path) -> None:
    args = with_defaults(
        [
            "fit",
            "--config",
            str(EXPERIMENTS / config),
            "--data.root",
            str(tiny_stores),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path / "runs"),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.fast_dev_run",
            "true",
            "--trainer.accelerator",
            "cpu",
            "--trainer.precision",
            precision,
            "--data.batch_size",
            "2",
            "--data.eval_batch_size",
            "2",
            *smoke_args(config),
        ]
    )
    cli = lightning_main(args)
    assert cli.trainer.state.finished
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize("config", sorted(DEMO_OVERRIDES))
def test_demo_overrides_name_real_options(config: str, tiny_stores: Path, tmp_path: Path) -> None:
    """The demo's CPU-sized models (``demo.DEMO_OVERRIDES``) build from their experiment with those options."""
    args = ["--config", str(EXPERIMENTS.parent / config), "--data.root", str(tiny_stores), *demo_overrides(config)]
    cli = lightning_main(with_defaults(args), run=False)
    core = cli.model.encoder.core
    for option, value in DEMO_OVERRIDES[config].items():
        if option.startswith("model.core.init_args.") and value.isdigit():
            assert getattr(core, option.rsplit(".", 1)[1], int(value)) == int(value)
    assert cli.model.frame_step == cli.datamodule.frame_step  # linked
    if "data.frame_step" in DEMO_OVERRIDES[config]:
        assert cli.datamodule.frame_step == int(DEMO_OVERRIDES[config]["data.frame_step"])
    if "trainer.callbacks+" in DEMO_OVERRIDES[config]:  # appended to the experiment's callbacks, not replacing them
        appended = json.loads(DEMO_OVERRIDES[config]["trainer.callbacks+"])["class_path"].rsplit(".", 1)[1]
        names = {type(c).__name__ for c in cli.trainer.callbacks}
        assert {appended, "ModelCheckpoint"} <= names


@pytest.mark.parametrize(
    ("capabilities", "expected"),
    [
        ({"amx_bf16": True}, "bf16-mixed"),
        ({"avx512_bf16": True}, "bf16-mixed"),
        ({"avx2": True}, "32-true"),
        (None, "32-true"),
    ],
)
def test_demo_precision_auto_follows_native_bf16(
    capabilities: dict[str, bool] | None, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--precision auto`` is bf16-mixed only where the CPU computes bf16 natively (or a torch without
    ``torch.cpu.get_capabilities``: float32); an explicit precision passes through."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if capabilities is None:
        monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    else:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities, raising=False)
    assert resolve_precision("auto") == expected
    assert resolve_precision("16-mixed") == "16-mixed"
