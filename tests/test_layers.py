"""The package's layering (``[tool.importlinter]`` in pyproject.toml): kept by the tree, broken by an upward import."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason="import-linter missing: pip install -e .[dev]")

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the package and pyproject.toml under ``root`` (the copy there, not the installed one)."""
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run(
        [sys.executable, "-c", code, "--no-cache", "--no-logo"],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": ""},
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the package and its pyproject.toml, to break on purpose."""
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "lightning_sensorium", tmp_path / "lightning_sensorium", ignore=skip)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def test_the_tree_keeps_its_layers() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # The data layer reaching up to the training step.
        ("data/store.py", "from lightning_sensorium import module", "layers"),
        # A workflow importing the command line: nothing imports cli.py.
        ("ensemble.py", "from lightning_sensorium.cli import main", "layers"),
        # Function-local imports count too.
        ("models/layers.py", "def _f():\n    from lightning_sensorium.evaluate import evaluate", "layers"),
        # Two workflows importing each other: allowed by the layers, refused as a cycle.
        ("ensemble.py", "from lightning_sensorium import inference", "cycles"),
    ],
)
def test_an_upward_import_breaks_the_layers(tree: Path, module: str, line: str, broken: str) -> None:
    assert lint_imports(tree).returncode == 0  # the copy is clean before the injection
    path = tree / "lightning_sensorium" / module
    path.write_text(path.read_text() + f"\n\n{line}\n")
    result = lint_imports(tree)
    assert result.returncode != 0, result.stdout
    expected = "import cycles" if broken == "cycles" else "entry points -> workflows"
    assert any(expected in ln and "BROKEN" in ln for ln in result.stdout.splitlines()), result.stdout
