"""``--ckpt_path last`` resumes the newest whole checkpoint of the run, whatever its link says, and finds the
run however its save folder is spelled."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from pretrain.checkpointing.sharded import check_sharded_folder
from pretrain.errors import UserError
from tests.helpers.runs import assert_ok, tiny_fit_args

KEEP_ALL = ("--checkpoint.save_top_k", "-1")


def run_dir(logs: Path) -> Path:
    return logs / "quickstart" / "version_0" / "checkpoints"


def first_run(run_cli, corpus, prepared: Path, logs: Path) -> Path:
    """40 steps, saved at 20 and 40; returns the checkpoint folder."""
    assert_ok(run_cli(*tiny_fit_args(corpus[0], prepared, logs, *KEEP_ALL)))
    return run_dir(logs)


def resume(run_cli, corpus, prepared: Path, logs: Path, *extra: str):
    args = tiny_fit_args(corpus[0], prepared, logs, *KEEP_ALL, "--trainer.max_steps", "60", "--ckpt_path", "last")
    return run_cli(*args, *extra)


def resumed_step(result) -> int:
    """The step of the checkpoint the run says it resumes from."""
    return int(re.search(r"Resuming \S+ from \S*step=(\d+)", result.stderr).group(1))


def test_a_dangling_link_is_named_and_the_newest_whole_step_resumes(corpus, prepared: Path, tmp_path: Path, run_cli):
    checkpoints = first_run(run_cli, corpus, prepared, tmp_path)
    (checkpoints / "step=0000040.ckpt").unlink()  # pruned, or lost with a crash: last.ckpt now dangles
    result = resume(run_cli, corpus, prepared, tmp_path)
    assert_ok(result)
    assert "Skipping" in result.stderr and "which is gone" in result.stderr
    assert resumed_step(result) == 20
    assert sorted(p.name for p in (tmp_path / "quickstart").iterdir()) == ["version_0"]  # the same run continues
    assert (checkpoints / "last.ckpt").resolve().name == "step=0000060.ckpt"


def test_a_truncated_newest_checkpoint_is_passed_over(corpus, prepared: Path, tmp_path: Path, run_cli) -> None:
    checkpoints = first_run(run_cli, corpus, prepared, tmp_path)
    newest = checkpoints / "step=0000040.ckpt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    result = resume(run_cli, corpus, prepared, tmp_path)
    assert_ok(result)
    assert "not a whole checkpoint file" in result.stderr and "Traceback" not in result.stderr
    assert resumed_step(result) == 20


def test_nothing_whole_is_refused_rather_than_started_over(corpus, prepared: Path, tmp_path: Path, run_cli) -> None:
    """A requeued job must not quietly train from step 0 over a run whose saves were all damaged."""
    checkpoints = first_run(run_cli, corpus, prepared, tmp_path)
    for step in ("0000020", "0000040"):
        path = checkpoints / f"step={step}.ckpt"
        path.write_bytes(path.read_bytes()[:100])
    result = resume(run_cli, corpus, prepared, tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("Skipping") == 3  # the link and both steps
    assert "version_0 is whole (see the warnings above), so it cannot be resumed" in result.stderr
    assert not (tmp_path / "quickstart" / "version_1").exists()


def test_the_same_run_under_another_spelling_of_its_folder_relinks_last(
    corpus, prepared: Path, tmp_path: Path, run_cli
) -> None:
    checkpoints = first_run(run_cli, corpus, prepared, tmp_path / "logs")  # an absolute path
    result = resume(run_cli, corpus, prepared, tmp_path / "logs", "--trainer.logger.init_args.save_dir", "./logs")
    assert_ok(result)
    assert resumed_step(result) == 40
    assert not list(checkpoints.glob("last-v*.ckpt"))
    assert (checkpoints / "last.ckpt").resolve().name == "step=0000060.ckpt"


def test_a_sharded_folder_missing_a_data_file_is_named_as_incomplete(tmp_path: Path) -> None:
    folder = tmp_path / "step=0000010.ckpt"
    dcp.save({"state_dict": {"w": torch.ones(4)}, "step": 10}, checkpoint_id=folder, no_dist=True)
    next(folder.glob("*.distcp")).unlink()
    with pytest.raises(UserError, match=r"is incomplete: .*distcp is missing") as error:
        check_sharded_folder(folder)
    assert "weights_only" not in str(error.value)
