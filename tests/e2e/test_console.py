"""The installed commands in real processes: `pretrain`, `python main.py` and `python -m pretrain.<tool>` report a
user mistake in one line, with status 2 and no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.runs import QUICKSTART, ROOT

PRETRAIN = Path(sys.executable).parent / "pretrain"  # the console script pip installs beside the interpreter
MISSING = ("--data.sources", "[no/such/corpus]", "--data.data_dir", "data")


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_pretrain_command_lists_its_subcommands(tmp_path: Path) -> None:
    if not PRETRAIN.exists():
        pytest.skip("the project is not installed (pip install -e .)")
    result = run([str(PRETRAIN), "--help"], tmp_path)
    assert result.returncode == 0
    for command in ("fit", "validate", "test", "prepare", "generate", "export", "benchmark"):
        assert f"  {command} " in result.stdout


@pytest.mark.parametrize(
    "command",
    [
        [str(PRETRAIN), "prepare", "--config", QUICKSTART, *MISSING],
        [sys.executable, str(ROOT / "main.py"), "fit", "--config", QUICKSTART, *MISSING],
        [sys.executable, "-m", "pretrain.commands.prepare", "--config", QUICKSTART, *MISSING],
        [sys.executable, "-m", "pretrain.commands.generate", "no/such.ckpt"],
        [sys.executable, "-m", "pretrain.commands.export", "no/such.ckpt", "out"],
    ],
    ids=[
        "pretrain prepare",
        "main.py fit",
        "-m pretrain.commands.prepare",
        "-m pretrain.commands.generate",
        "-m pretrain.commands.export",
    ],
)
def test_a_user_mistake_is_one_line_with_status_2(command: list[str], tmp_path: Path) -> None:
    if command[0] == str(PRETRAIN) and not PRETRAIN.exists():
        pytest.skip("the project is not installed (pip install -e .)")
    result = run(command, tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and ("does not exist" in errors[0]), result.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []  # nothing half-written
