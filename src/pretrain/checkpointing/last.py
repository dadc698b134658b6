"""Which checkpoint ``--ckpt_path last`` resumes: the newest whole one of the experiment's newest run, whatever
its ``last`` link says. A dangling or stale link, a truncated or damaged file and a partial sharded folder are
each named in one warning and passed over for the next older checkpoint."""

from __future__ import annotations

import logging
import re
import zipfile
from pathlib import Path

import torch

from pretrain.checkpointing.sharded import check_sharded_folder
from pretrain.errors import UserError

log = logging.getLogger(__name__)
STEP = re.compile(r"step=(\d+)")


def find_last_checkpoint(save_dir: str | Path, name: str) -> tuple[int, Path | None] | None:
    """The newest whole checkpoint of the newest run of experiment ``name`` that saved any: (version, path), with
    path None where every checkpoint of that run is damaged (each named in a warning); None where no run saved."""
    runs = []
    for run in (Path(save_dir) / name).glob("version_*"):
        match = re.fullmatch(r"version_(\d+)", run.name)
        if match and (candidates := checkpoints_newest_first(run / "checkpoints")):
            runs.append((int(match.group(1)), candidates))
    if not runs:
        return None
    version, candidates = max(runs)
    for candidate in candidates:
        problem = checkpoint_problem(candidate)
        if problem is None:
            return version, candidate
        log.warning("Skipping %s: %s", candidate, problem)
    return version, None


def checkpoints_newest_first(folder: Path) -> list[Path]:
    """The checkpoints (files and sharded folders) in ``folder``, the newest step first: ``last``'s target by its
    own name, then the step files, by step, and by modification time among names without one."""
    if not folder.is_dir():
        return []
    found = {
        path
        for path in folder.iterdir()
        if path.suffix == ".ckpt" and not path.is_symlink() and not path.name.startswith(".")  # hidden: unfinished
    }
    last = folder / "last.ckpt"
    if last.is_symlink():
        found.add(last)  # judged by its target, which may be missing
    return sorted(found, key=_recency, reverse=True)


def _recency(path: Path) -> tuple[int, float, bool]:
    """(global step, modification time, is the link): the step from the name (a link's target's), else from the
    file. The link goes before its own target, so the run resumes from ``last`` as Lightning's own ``last``
    would, and its ``save_top_k`` later removes the step file as usual (never the one resumed from)."""
    match = STEP.search(path.resolve().name if path.is_symlink() else path.name)
    try:
        modified = path.stat().st_mtime
    except OSError:  # a dangling link
        modified = 0.0
    return (int(match.group(1)) if match else _saved_step(path), modified, path.is_symlink())


def _saved_step(path: Path) -> int:
    """The global step a checkpoint file records (a ``last.ckpt`` saved as a copy); -1 where it cannot be read."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception:  # damaged, or not a Lightning checkpoint: judged when its turn comes
        return -1


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from (None: it is whole): missing, cut short, damaged or partial. Reads a
    file's every byte once (its checksums), and a sharded folder's index and the sizes of its data files."""
    if path.is_symlink() and not path.exists():
        return f"it points at {path.resolve().name}, which is gone"
    if path.is_dir():
        try:
            check_sharded_folder(path)
        except UserError as error:
            return str(error)
        # Lightning writes the rest of the state (steps, loops, schedule) last, from rank 0
        return None if (path / "meta.pt").is_file() else "it has no meta.pt: a save that did not finish"
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        return f"it is not a whole checkpoint file ({error})"
    return f"its entry {damaged} is damaged" if damaged else None
