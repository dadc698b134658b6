"""The README's quickstart, verbatim, in a process of its own (minutes): `pytest -m slow`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.runs import QUICKSTART, assert_ok, run_main, scalars


@pytest.mark.slow
def test_quickstart_meets_its_promise(tmp_path: Path) -> None:
    """The last val/loss ends below 0.6 x the first train/loss, and the built-in task above chance (4 choices)."""
    result = run_main("fit", "--config", QUICKSTART, cwd=tmp_path, timeout=900)
    assert_ok(result)
    run_dir = tmp_path / "logs" / "quickstart" / "version_0"
    assert scalars(run_dir, "val/loss")[-1] < 0.6 * scalars(run_dir, "train/loss")[0]
    assert scalars(run_dir, "eval/next_line/acc")[-1] > 0.25 and scalars(run_dir, "eval/next_line/acc_norm")[-1] > 0.25
