"""kill -9 while a checkpoint is written in the background: the previous checkpoint stays whole, the next start
removes the unfinished file, and the resumed run repeats the uninterrupted one's losses bit for bit."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.checkpointing.commit import UNFINISHED
from tests.helpers.processes import kill_with_its_children
from tests.helpers.resume import fit_args
from tests.helpers.runs import ROOT, assert_ok, run_main, scalars_by_step

STEPS = 40
# A model whose checkpoint (weights and optimizer state, ~60 MB) takes a while to write and fsync, so that
# the kill lands in the middle of a background write.
LARGER = ("--model.overrides", "{d_model: 256, n_layer: 4, n_head: 4, n_kv_head: 4, ffn_dim: 1024}")
BACKGROUND = ("--checkpoint.async_save", "true", "--checkpoint.every_n_train_steps", "5", *LARGER)


def args(corpus, prepared: Path, logs: Path, *extra: str) -> list[str]:
    return fit_args(
        corpus[0], prepared, logs, STEPS, *BACKGROUND, "--model.lr_scheduler.init_args.max_steps", str(STEPS), *extra
    )


def kill_during_a_background_write(process: subprocess.Popen, checkpoints: Path, timeout: float = 300) -> str:
    """kill -9 the run as soon as a checkpoint file is being written after the first whole one; its name."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if (checkpoints / "last.ckpt").is_symlink():
            writing = [path.name for path in checkpoints.iterdir() if UNFINISHED.fullmatch(path.name)]
            if writing:
                kill_with_its_children(process)
                return writing[0]
        time.sleep(0.001)
    kill_with_its_children(process)
    pytest.fail(f"no background write was seen; output: {process.communicate(timeout=60)[1][-3000:]}")


def test_kill_9_during_a_background_write_resumes_exactly(corpus, prepared: Path, tmp_path: Path) -> None:
    reference_logs = tmp_path / "reference"
    reference_logs.mkdir()
    assert_ok(run_main(*args(corpus, prepared, reference_logs), cwd=reference_logs))
    reference = scalars_by_step(reference_logs / "quickstart" / "version_0", "train/loss")

    logs = tmp_path / "killed"
    logs.mkdir()
    checkpoints = logs / "quickstart" / "version_0" / "checkpoints"
    command = [sys.executable, str(ROOT / "main.py"), *args(corpus, prepared, logs)]
    process = subprocess.Popen(command, cwd=logs, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    unfinished = kill_during_a_background_write(process, checkpoints)
    process.communicate(timeout=60)
    assert (checkpoints / unfinished).exists() and (checkpoints / "last.ckpt").resolve().exists()

    result = run_main(*args(corpus, prepared, logs, "--ckpt_path", "last"), cwd=logs)
    assert_ok(result)
    assert f"Removed {checkpoints / unfinished}: a checkpoint save that did not finish" in result.stderr
    assert scalars_by_step(logs / "quickstart" / "version_0", "train/loss") == reference  # bit-exact
