"""The command line: every subcommand answers --help quickly, defaults.yaml is prepended, entry points exist."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_sensorium.cli import LIGHTNING_SUBCOMMANDS, build_parser, main
from lightning_sensorium.launch import to_cli_args, with_experiment_defaults

OWN = ("synth", "convert", "evaluate")


@pytest.mark.parametrize("command", OWN)
def test_own_subcommand_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"lightning-sensorium {command}" in out
    assert len(out.splitlines()) > 5


@pytest.mark.parametrize("command", LIGHTNING_SUBCOMMANDS)
def test_lightning_subcommand_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--data.root" in out
    assert "--model.core" in out


def test_top_level_help_lists_everything() -> None:
    text = build_parser().format_help()
    for command in (*OWN, *LIGHTNING_SUBCOMMANDS):
        assert command in text


def test_no_arguments_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert "usage:" in capsys.readouterr().out


def test_defaults_are_prepended(tmp_path: Path) -> None:
    (tmp_path / "defaults.yaml").write_text("seed_everything: 1\n")
    exp = str(tmp_path / "model.yaml")
    assert with_experiment_defaults(["fit", "--config", exp, "--x", "1"]) == [
        "fit",
        "--config",
        str(tmp_path / "defaults.yaml"),
        "--config",
        exp,
        "--x",
        "1",
    ]
    assert with_experiment_defaults(["fit", f"--config={exp}"])[2] == str(tmp_path / "defaults.yaml")
    # An explicit defaults file, or none beside the config, leaves the arguments alone.
    explicit = ["fit", "--config", str(tmp_path / "defaults.yaml"), "--config", exp]
    assert with_experiment_defaults(explicit) == explicit
    missing = ["fit", "--config", "/nonexistent/x.yaml"]
    assert with_experiment_defaults(missing) == missing


def test_python_dash_m_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lightning_sensorium", "--version"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    assert "lightning-sensorium" in result.stdout


def test_bad_input_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["evaluate", "--ckpt_path", str(tmp_path / "missing.ckpt")])
    assert code == 2
    err = capsys.readouterr().err
    assert "missing.ckpt" in err
    assert "Traceback" not in err


def test_options_become_arguments() -> None:
    values = {"data.frames": 40, "data.root": "/x/y", "model.flag": True, "trainer.devices": [0, 1], "a.b": None}
    assert to_cli_args(values) == [
        "--data.frames",
        "40",
        "--data.root",
        "/x/y",
        "--model.flag",
        "true",
        "--trainer.devices",
        "[0, 1]",
        "--a.b",
        "null",
    ]


def test_help_does_not_load_the_training_stack() -> None:
    """``--help`` of the project's own subcommands never imports Lightning, the model or the workflows."""
    code = (
        "import sys\n"
        "from lightning_sensorium.cli import main\n"
        "try:\n"
        "    main(['submit', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('lightning', 'torch', 'lightning_sensorium.launch', 'lightning_sensorium.module') "
        "if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in result.stdout, result.stdout


def test_infer_refuses_to_overwrite_without_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "preds.zarr"
    out.mkdir()
    assert main(["infer", "--ckpt_path", str(tmp_path / "a.ckpt"), "--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
