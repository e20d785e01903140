"""Every experiments/*.yaml fits end to end on tiny synthetic mice (``fast_dev_run``), shrunk to seconds on CPU.

``SMOKE`` holds, per config, the overrides that make its model tiny (fewer channels, shorter windows); the recipe
itself (loss, optimiser, callbacks, data mode) is what the YAML says. Every config must have an entry.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_sensorium.cli import lightning_main, with_defaults

EXPERIMENTS = Path(__file__).parents[1] / "experiments"
CONFIGS = sorted(p.name for p in EXPERIMENTS.glob("*.yaml") if p.name != "defaults.yaml")

#: config file → extra command-line overrides that shrink the model for a CPU smoke test.
SMOKE: dict[str, list[str]] = {
    "dynamic_v1fm.yaml": [
        "--model.core.init_args.embed_dim",
        "8",
        "--model.core.init_args.num_heads",
        "2",
        "--model.core.init_args.mlp_hidden",
        "4",
        "--model.core.init_args.num_blocks",
        "2",
        "--model.core.init_args.window_size",
        "[2, 3, 3]",
        "--data.frames",
        "8",
        "--model.eval_window",
        "8",
        "--model.eval_stride",
        "4",
    ],  # fmt: skip  # noqa: E501
    "factorized.yaml": ["--model.core.init_args.hidden_channels", "[4, 4, 4]", "--data.frames", "24"],
    "viv1t.yaml": [
        "--model.core.init_args.dim",
        "8",
        "--model.core.init_args.heads",
        "2",
        "--model.core.init_args.head_dim",
        "4",
        "--model.core.init_args.ff_dim",
        "8",
        "--model.core.init_args.spatial_depth",
        "1",
        "--model.core.init_args.temporal_depth",
        "1",
        "--model.core.init_args.spatial_patch",
        "4",
        "--model.core.init_args.spatial_stride",
        "4",
        "--model.core.init_args.temporal_patch",
        "3",
        "--data.frames",
        "30",
    ],  # fmt: skip  # noqa: E501
    "gru.yaml": [
        "--model.core.init_args.hidden_channels",
        "2",
        "--model.core.init_args.num_rotations",
        "4",
        "--model.core.init_args.gru_channels",
        "4",
        "--data.frames",
        "12",
    ],  # fmt: skip  # noqa: E501
    "dwiseneuro.yaml": [
        "--model.core.init_args.features",
        "[4, 8]",
        "--model.core.init_args.spatial_strides",
        "[2, 2]",
        "--model.core.init_args.expansion",
        "2",
        "--model.core.init_args.se_reduction",
        "4",
        "--model.core.init_args.cortex_features",
        "[8, 16]",
        "--data.frames",
        "8",
        "--model.eval_window",
        "8",
        "--model.eval_stride",
        "7",
    ],  # fmt: skip  # noqa: E501
    "dwiseneuro_distill.yaml": [
        "--model.core.init_args.features",
        "[4, 8]",
        "--model.core.init_args.spatial_strides",
        "[2, 2]",
        "--model.core.init_args.expansion",
        "2",
        "--model.core.init_args.se_reduction",
        "4",
        "--model.core.init_args.cortex_features",
        "[8, 16]",
        "--data.frames",
        "8",
        "--model.eval_window",
        "8",
        "--model.eval_stride",
        "7",
    ],  # fmt: skip  # noqa: E501
}


def test_every_config_has_a_smoke_entry() -> None:
    assert set(CONFIGS) <= set(SMOKE), f"add a SMOKE entry for {sorted(set(CONFIGS) - set(SMOKE))}"


@pytest.mark.parametrize("config", CONFIGS)
def test_every_experiment_fits(config: str, tiny_stores: Path, tmp_path: Path) -> None:
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
            "--data.batch_size",
            "2",
            "--data.eval_batch_size",
            "2",
            *SMOKE.get(config, []),
        ]
    )
    cli = lightning_main(args)
    assert cli.trainer.state.finished
