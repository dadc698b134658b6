"""A checkpoint appears under its name only once whole, and what a killed save left behind is removed at the
next start (the two-process FSDP2 saves: tests/e2e/test_parallel.py)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.strategies import SingleDeviceStrategy

from pretrain.checkpointing.commit import commit_saves_by_rename, remove_unfinished_saves
from pretrain.checkpointing.last import checkpoint_problem
from tests.helpers.resume import TRAINED_STEPS
from tests.helpers.runs import assert_ok, tiny_fit_args


class Killed(Exception):
    """Stands for a process killed mid-save."""


def folder_writer(shards: int, killed_after: int | None = None):
    """A strategy's sharded save: one file per rank, the index last; ``killed_after`` shards, then killed."""

    def save(checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        path.mkdir(parents=True)
        for rank in range(shards):
            if rank == killed_after:
                raise Killed
            (path / f"__{rank}_0.distcp").write_bytes(bytes([checkpoint["step"]]) * 1000)
        (path / ".metadata").write_text("index")

    return save


def strategy_saving(save) -> SingleDeviceStrategy:
    strategy = SingleDeviceStrategy(device=torch.device("cpu"))
    strategy.save_checkpoint = save
    commit_saves_by_rename(strategy)
    return strategy


def test_a_folder_appears_under_its_name_only_when_whole(tmp_path: Path) -> None:
    final = tmp_path / "step=0000020.ckpt"
    strategy_saving(folder_writer(shards=2)).save_checkpoint({"step": 20}, final)
    assert sorted(p.name for p in final.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert [p.name for p in tmp_path.iterdir()] == [final.name]

    killed = strategy_saving(folder_writer(shards=2, killed_after=1))
    with pytest.raises(Killed):
        killed.save_checkpoint({"step": 40}, tmp_path / "step=0000040.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".partial-step=0000040.ckpt", final.name]


def test_a_folder_saved_again_under_the_same_name_replaces_the_old_one_whole(tmp_path: Path) -> None:
    final = tmp_path / "step=0000020.ckpt"
    strategy_saving(folder_writer(shards=2)).save_checkpoint({"step": 1}, final)
    strategy_saving(folder_writer(shards=1)).save_checkpoint({"step": 2}, final)
    assert sorted(p.name for p in final.iterdir()) == [".metadata", "__0_0.distcp"]
    assert (final / "__0_0.distcp").read_bytes() == bytes([2]) * 1000
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


def test_only_what_a_killed_save_left_is_removed(tmp_path: Path) -> None:
    (tmp_path / ".partial-step=0000040.ckpt").mkdir()
    (tmp_path / ".replaced-step=0000020.ckpt").mkdir()
    (tmp_path / ".step=0000040.ckpt.4242.tmp").write_bytes(b"x" * 100)
    (tmp_path / ".last.ckpt.4242.tmp").symlink_to("step=0000020.ckpt")
    kept = ["step=0000020.ckpt", ".notes", "step=0000030.ckpt.tmp", "partial-step=1.ckpt"]
    for name in kept:
        (tmp_path / name).write_text("the user's")
    lines = []
    removed = remove_unfinished_saves(tmp_path, lambda *args: lines.append(args[0] % args[1:]))
    assert len(removed) == len(lines) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def test_a_save_killed_between_its_two_renames_is_finished_at_the_next_start(tmp_path: Path) -> None:
    for name, step in ((".replaced-step=0000020.ckpt", 1), (".partial-step=0000020.ckpt", 2)):
        folder_writer(shards=1)({"step": step}, tmp_path / name)  # the old one moved aside, the new one whole
    lines = []
    remove_unfinished_saves(tmp_path, lambda *args: lines.append(args[0] % args[1:]))
    assert [p.name for p in tmp_path.iterdir()] == ["step=0000020.ckpt"]
    assert (tmp_path / "step=0000020.ckpt" / "__0_0.distcp").read_bytes() == bytes([2]) * 1000  # the new one
    assert lines[0].startswith(f"Restored {tmp_path / 'step=0000020.ckpt'}")


def test_a_sharded_folder_without_lightnings_state_file_is_unfinished(tmp_path: Path) -> None:
    folder = tmp_path / "step=0000010.ckpt"
    dcp.save({"state_dict": {"w": torch.ones(4)}}, checkpoint_id=folder, no_dist=True)
    assert checkpoint_problem(folder) == "it has no meta.pt: a save that did not finish"
    torch.save({"global_step": 10}, folder / "meta.pt")
    assert checkpoint_problem(folder) is None


def test_a_resume_removes_a_killed_saves_leftovers_and_never_picks_them(
    corpus, prepared: Path, trained: Path, tmp_path: Path, run_cli
) -> None:
    run = tmp_path / "quickstart" / "version_0"
    shutil.copytree(trained, run, symlinks=True)
    checkpoints = run / "checkpoints"
    partial = checkpoints / f".partial-step={TRAINED_STEPS + 5:07d}.ckpt"  # newer than any whole one
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"\0" * 4096)
    temporary = checkpoints / f".step={TRAINED_STEPS + 5:07d}.ckpt.4242.tmp"
    temporary.write_bytes(b"\0" * 4096)
    args = tiny_fit_args(corpus[0], prepared, tmp_path, "--trainer.max_steps", str(TRAINED_STEPS + 10))
    result = run_cli(*args, "--ckpt_path", "last")
    assert_ok(result)
    assert f"Resuming {tmp_path}/quickstart/version_0 from {checkpoints}/step={TRAINED_STEPS:07d}.ckpt" in result.stderr
    assert f"Removed {partial}: a checkpoint save that did not finish" in result.stderr
    assert not partial.exists() and not temporary.exists()
    assert not [path for path in checkpoints.iterdir() if path.name.startswith(".")]
