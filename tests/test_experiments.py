"""Every experiments/*.yaml fits end to end on tiny synthetic mice (``fast_dev_run``), shrunk to seconds on CPU,
in float32 and under bf16 autocast (``bf16-mixed``, the mixed precision every model supports).

``tests/configs/<model>.yaml``, layered over each experiment as a second ``--config``, makes its model tiny (fewer
channels, shorter windows); the recipe itself (loss, optimiser, callbacks, data mode) is what the YAML says. Every
experiment must have one. The CPU recipes of ``experiments/cpu/`` (what the demo trains) are checked to build.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lightning_sensorium.demo import fit_args, resolve_precision
from lightning_sensorium.launch import cpu_recipe, memory_hint, run_lightning, with_experiment_defaults

EXPERIMENTS = Path(__file__).parents[1] / "experiments"
CONFIGS = sorted(p.name for p in EXPERIMENTS.glob("*.yaml") if p.name != "defaults.yaml")
TINY = Path(__file__).parent / "configs"
CPU_CONFIGS = sorted(p.name for p in (EXPERIMENTS / "cpu").glob("*.yaml"))


def smoke_args(config: str) -> list[str]:
    """The tiny model of ``config`` (``tests/configs/<config>``) as a second ``--config``."""
    return ["--config", str(TINY / config)]


def tiny_args(config: str, tiny_stores: Path, tmp_path: Path, *extra: str) -> list[str]:
    """Arguments of ``config`` at its tiny smoke size on ``tiny_stores``, logging under ``tmp_path``, then ``extra``."""
    return [
        "--config",
        str(EXPERIMENTS / config),
        *smoke_args(config),
        "--data.root",
        str(tiny_stores),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
        "--trainer.default_root_dir",
        str(tmp_path),
        *extra,
    ]


def test_every_config_has_a_tiny_smoke_config() -> None:
    missing = sorted(set(CONFIGS) - {p.name for p in TINY.glob("*.yaml")})
    assert not missing, f"add tests/configs/ files for {missing}"


def test_every_trainable_experiment_has_a_cpu_recipe() -> None:
    """Every experiment that trains from scratch has a CPU recipe (stage 2 needs a trained teacher)."""
    assert set(CPU_CONFIGS) == set(CONFIGS) - {"dwiseneuro_distill.yaml"}
    assert cpu_recipe(EXPERIMENTS / "factorized.yaml") == EXPERIMENTS / "cpu" / "factorized.yaml"
    assert cpu_recipe(EXPERIMENTS / "dwiseneuro_distill.yaml") is None


def test_the_memory_hint_names_the_experiments_own_cpu_recipe() -> None:
    viv1t, cpu = str(EXPERIMENTS / "viv1t.yaml"), str(EXPERIMENTS / "cpu" / "viv1t.yaml")
    hint = memory_hint([str(EXPERIMENTS / "defaults.yaml"), viv1t])
    assert hint is not None and f"--config {cpu}` after `--config {viv1t}`" in hint
    assert memory_hint([viv1t, cpu]) is None  # applied already: the generic advice
    assert memory_hint([str(EXPERIMENTS / "dwiseneuro_distill.yaml")]) is None


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("config", CONFIGS)
def test_every_experiment_fits(config: str, precision: str, tiny_stores: Path, tmp_path: Path) -> None:
    args = with_experiment_defaults(
        [
            "fit",
            *tiny_args(config, tiny_stores, tmp_path),
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
        ]
    )
    cli = run_lightning(args)
    assert cli.trainer.state.finished
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def _core_args(path: Path) -> dict[str, object]:
    return yaml.safe_load(path.read_text())["model"]["core"]["init_args"]


@pytest.mark.parametrize("config", CPU_CONFIGS)
def test_cpu_recipes_build_as_the_demo_layers_them(config: str, tiny_stores: Path) -> None:
    """The demo's arguments (experiment, then its CPU recipe) build the CPU-sized model: the recipe's integer core
    options reach the core, data-derived values stay linked, and callbacks the recipe appends (``callbacks+``) join
    the experiment's instead of replacing them."""
    args = fit_args(str(EXPERIMENTS / config), tiny_stores, minutes=1.0, precision="32-true")[1:]
    cli = run_lightning(with_experiment_defaults(args), run=False)
    core = cli.model.encoder.core
    for option, value in _core_args(EXPERIMENTS / "cpu" / config).items():
        if isinstance(value, int) and not isinstance(value, bool) and hasattr(core, option):
            assert getattr(core, option) == value, option
    assert cli.model.frame_step == cli.datamodule.frame_step  # linked
    names = {type(c).__name__ for c in cli.trainer.callbacks}
    if config in ("factorized.yaml", "dwiseneuro.yaml"):
        assert {"EMA", "ModelCheckpoint"} <= names
    if config == "factorized.yaml":
        assert cli.datamodule.frame_step == 2
        assert {"PlateauRestore", "LearningRateMonitor"} <= names  # appended, not replaced


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
