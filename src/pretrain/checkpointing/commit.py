"""Checkpoints appear under their name only once whole; what a killed save left behind is removed at the next start.

A single file is written beside its target and renamed over it (``AtomicCheckpointIO``). A sharded checkpoint
is a folder every rank writes into, and Lightning's FSDP strategies write it in place: here it is written as
``.partial-NAME`` and renamed to ``NAME`` by rank 0 once every rank has written its shard and the folder is on
disk. The rename is the commit: a folder under a checkpoint's name is always complete, so ``--ckpt_path last``
and the spike rollback never pick a partial one.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from lightning.pytorch.strategies import FSDPStrategy, Strategy
from torch.distributed.tensor import DTensor

from pretrain.checkpointing.background import BackgroundWrites, host_copy

log = logging.getLogger(__name__)
PARTIAL = ".partial-"  # a save in progress, or one that was killed
REPLACED = ".replaced-"  # the older checkpoint of the same name, removed once the new one is in place
# What the saves of this package write before they commit: a file's temporary copy (``.NAME.PID.tmp``), the
# ``last`` link's (``.last.ckpt.PID.tmp``), a folder in progress and one being replaced.
UNFINISHED = re.compile(rf"(\..+\.ckpt\.\d+\.tmp|{re.escape(PARTIAL)}.+\.ckpt|{re.escape(REPLACED)}.+\.ckpt)")


def commit_saves_by_rename(strategy: Strategy, writes: BackgroundWrites | None = None) -> None:
    """Make ``strategy`` write each checkpoint under a temporary name and rename it when every rank is done.

    With ``writes``, a sharded state (DTensors: FSDP2) is staged in host memory and written in the background
    (``torch.distributed.checkpoint.async_save``), then committed; other states are written as the strategy
    writes them (a full state through the checkpoint IO, in the background too), and committed after.
    """
    save = strategy.save_checkpoint
    if getattr(save, "commits_by_rename", False):  # set up by an earlier stage of the same trainer
        return
    background_group: list[Any] = []  # the gloo group of the background writes, made at the first one

    def save_then_commit(checkpoint: dict[str, Any], filepath: str | Path, storage_options: Any = None) -> None:
        final = Path(strategy.broadcast(str(filepath)))
        partial = final.with_name(PARTIAL + final.name)
        if writes is not None:
            writes.wait()  # at most one save in flight
        if strategy.is_global_zero:
            _remove(partial)  # a killed save's, under the same name
        strategy.barrier()
        if writes is not None and _holds_shards(checkpoint):
            if not background_group:
                background_group.append(dist.new_group(backend="gloo") if dist.is_initialized() else None)
            key = "model" if isinstance(strategy, FSDPStrategy) else "state_dict"  # where each reads its weights
            _save_shards_in_background(strategy, checkpoint, key, partial, final, writes, background_group[0])
            return
        save(checkpoint, partial, storage_options)
        strategy.barrier()  # every rank's shard is written (or queued, where the checkpoint IO writes later)
        if strategy.is_global_zero:
            if writes is None:
                _commit(partial, final)
            else:
                writes.after_writes(lambda: _commit(partial, final))
        strategy.barrier()

    save_then_commit.commits_by_rename = True  # type: ignore[attr-defined]
    strategy.save_checkpoint = save_then_commit  # type: ignore[method-assign]


def _holds_shards(checkpoint: dict[str, Any]) -> bool:
    return any(isinstance(value, DTensor) for value in checkpoint.get("state_dict", {}).values())


def _save_shards_in_background(
    strategy: Strategy,
    checkpoint: dict[str, Any],
    key: str,
    partial: Path,
    final: Path,
    writes: BackgroundWrites,
    group: Any,
) -> None:
    """Lightning's sharded layout (weights under ``key``, ``optimizer_N``, the rest in ``meta.pt`` from
    rank 0), staged to host memory now and written by every rank in the background. Rank 0's write ends once
    every rank's shard is written (it gathers their results for the index): it then commits the folder."""
    shards = {key: checkpoint.pop("state_dict")}
    shards.update({f"optimizer_{i}": state for i, state in enumerate(checkpoint.pop("optimizer_states", []))})
    written = dcp.async_save(shards, checkpoint_id=partial, process_group=group)
    rest = host_copy(checkpoint)

    def finish() -> None:
        written.result()
        if strategy.is_global_zero:
            torch.save(rest, partial / "meta.pt")
            _commit(partial, final)

    writes.submit(finish)


def _commit(partial: Path, final: Path) -> None:
    """Flush ``partial`` to disk, then put it in ``final``'s place in one rename (an older one moved aside)."""
    for path in [*partial.rglob("*"), partial] if partial.is_dir() else [partial]:
        _fsync(path)
    if final.is_dir() and not final.is_symlink():  # a folder cannot be renamed over a folder that holds files
        replaced = final.with_name(REPLACED + final.name)
        _remove(replaced)
        os.replace(final, replaced)
        os.replace(partial, final)
        _remove(replaced)
    else:
        os.replace(partial, final)
    _fsync(final.parent)


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def remove_unfinished_saves(folder: Path, log_line: Callable[..., None] = log.warning) -> list[Path]:
    """Remove what a killed save left in a checkpoint folder (only names this package writes), each named. A save
    killed between the two renames of a folder saved again under its name is finished first: the new folder
    was whole before the old one was moved aside."""
    if not folder.is_dir():
        return []
    for replaced in sorted(folder.glob(f"{REPLACED}*.ckpt")):
        name = replaced.name.removeprefix(REPLACED)
        final, partial = folder / name, folder / (PARTIAL + name)
        if not final.exists():
            os.replace(partial if partial.exists() else replaced, final)
            log_line("Restored %s: its save was stopped while it replaced the previous one", final)
    removed = []
    for path in sorted(folder.iterdir()):
        if UNFINISHED.fullmatch(path.name):
            _remove(path)
            log_line("Removed %s: a checkpoint save that did not finish", path)
            removed.append(path)
    return removed
