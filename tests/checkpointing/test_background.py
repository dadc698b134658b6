"""Checkpoints written in the background hold the state of the step they were asked at, land in order, and a
failed write is reported (kill -9 during a write: tests/e2e/test_async_save.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from pretrain.checkpointing.background import BackgroundWrites, host_copy
from tests.helpers.resume import TRAINED_STEPS
from tests.helpers.runs import assert_ok, scalars_by_step, tiny_fit_args


def test_writes_and_their_follow_ups_run_in_order() -> None:
    writes, done = BackgroundWrites(), []
    writes.submit(lambda: (time.sleep(0.2), done.append("write")))
    writes.after_writes(lambda: done.append("link"))  # queued behind the write in flight
    assert done == []
    writes.wait()
    assert done == ["write", "link"]
    writes.after_writes(lambda: done.append("now"))  # nothing in flight: at once
    assert done == ["write", "link", "now"]


def test_a_failed_write_stops_what_follows_it_and_is_raised_in_the_training_thread() -> None:
    writes, done = BackgroundWrites(), []
    writes.submit(lambda: (time.sleep(0.2), 1 / 0))  # e.g. the disk is full
    writes.after_writes(lambda: done.append("relink last, remove the checkpoint it replaces"))
    with pytest.raises(ZeroDivisionError):
        writes.wait()
    assert done == []  # the previous checkpoint stays, and last points at it
    writes.wait()  # reported once
    writes.after_writes(lambda: done.append("next"))
    assert done == ["next"]


def test_the_host_copy_keeps_the_values_training_then_changes_in_place() -> None:
    weights = torch.ones(3)
    state = {"state_dict": {"w": weights}, "optimizer_states": [{"state": {0: {"m": weights * 2}}}], "step": 4}
    copied = host_copy(state)
    weights.add_(1)
    assert torch.equal(copied["state_dict"]["w"], torch.ones(3)) and copied["step"] == 4
    assert torch.equal(copied["optimizer_states"][0]["state"][0]["m"], torch.full((3,), 2.0))


def test_a_run_saving_in_the_background_saves_what_a_blocking_one_does(
    corpus, prepared: Path, trained: Path, tmp_path: Path, run_cli
) -> None:
    args = tiny_fit_args(corpus[0], prepared, tmp_path, "--trainer.max_steps", str(TRAINED_STEPS))
    assert_ok(run_cli(*args, "--checkpoint.async_save", "true"))
    run = tmp_path / "quickstart" / "version_0"
    name = f"step={TRAINED_STEPS:07d}.ckpt"
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == ["last.ckpt", name]
    background = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    blocking = torch.load(trained / "checkpoints" / name, weights_only=True)
    assert background["global_step"] == blocking["global_step"] == TRAINED_STEPS
    for key in ("state_dict", "optimizer_states"):
        torch.testing.assert_close(background[key], blocking[key], rtol=0, atol=0)
    stalls = scalars_by_step(run, "perf/checkpoint_block_sec")
    assert sorted(stalls) == [20, 40, TRAINED_STEPS] and all(value > 0 for value in stalls.values())
