"""Which checkpoint ``--ckpt_path last`` resumes."""

from __future__ import annotations

import re
from pathlib import Path


def find_last_checkpoint(save_dir: str | Path, name: str) -> tuple[int, Path] | None:
    """The newest run of experiment ``name`` that has a ``last`` checkpoint: (version, path)."""
    runs = []
    for run in (Path(save_dir) / name).glob("version_*"):
        match = re.fullmatch(r"version_(\d+)", run.name)
        last = run / "checkpoints" / "last.ckpt"
        if match and last.exists():
            runs.append((int(match.group(1)), last))
    return max(runs, default=None)
