"""A weighted mixture resumed on two processes: the global stream goes on where it stood on every rank."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.resume import check_mixture_resume
from tests.helpers.runs import run_main


def test_a_mixture_run_on_two_processes_resumes_exactly(mixture: dict, built: Path, tmp_path: Path) -> None:
    """Rank 0's logged losses depend on rank 1's data through the averaged gradients."""
    check_mixture_resume(lambda *args: run_main(*args, cwd=tmp_path), built, mixture, tmp_path, processes=2)
