"""The command line: every subcommand answers --help, defaults.yaml is prepended, entry points exist."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_sensorium.cli import LIGHTNING_SUBCOMMANDS, build_parser, main, with_defaults

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
    assert with_defaults(["fit", "--config", exp, "--x", "1"]) == [
        "fit",
        "--config",
        str(tmp_path / "defaults.yaml"),
        "--config",
        exp,
        "--x",
        "1",
    ]
    assert with_defaults(["fit", f"--config={exp}"])[2] == str(tmp_path / "defaults.yaml")
    # An explicit defaults file, or none beside the config, leaves the arguments alone.
    explicit = ["fit", "--config", str(tmp_path / "defaults.yaml"), "--config", exp]
    assert with_defaults(explicit) == explicit
    assert with_defaults(["fit", "--config", "/nonexistent/x.yaml"]) == ["fit", "--config", "/nonexistent/x.yaml"]


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
