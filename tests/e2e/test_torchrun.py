"""torchrun with 2 processes and loader workers: SIGTERM to torchrun (as a scheduler stopping the job) is
forwarded to every rank; the ranks agree on a step, save once, and the run resumes exactly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.processes import kill_with_its_children, wait_for_checkpoint
from tests.helpers.resume import STEPS, fit_args
from tests.helpers.runs import ROOT, scalars_by_step

TWO_RANKS = ("--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.num_workers", "1")


def torchrun(corpus, prepared: Path, logs: Path, *extra: str, restarts: int = 0) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        str(restarts),
        str(ROOT / "main.py"),
        *fit_args(corpus[0], prepared, logs, STEPS, *TWO_RANKS, *extra),
    ]
    logs.mkdir(exist_ok=True)
    # A store of its own for the ranks of each restart (docs/checkpointing.md: a lost rank).
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    return subprocess.Popen(
        command,
        cwd=logs,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=environment,
    )


def finished(process: subprocess.Popen, timeout: float = 300) -> str:
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_with_its_children(process)
        pytest.fail(f"torchrun did not finish in {timeout:.0f} s; output: {process.communicate(timeout=60)[1][-3000:]}")
    assert process.returncode == 0, stderr[-3000:]
    return stderr


@pytest.fixture(scope="module")
def reference(corpus, prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    logs = tmp_path_factory.mktemp("torchrun-reference")
    finished(torchrun(corpus, prepared, logs))
    return scalars_by_step(logs / "quickstart" / "version_0", "train/loss")


def test_sigterm_to_torchrun_saves_once_and_resumes_exactly(
    corpus, prepared: Path, tmp_path: Path, reference: dict[int, float]
) -> None:
    process = torchrun(corpus, prepared, tmp_path)
    checkpoints = tmp_path / "quickstart" / "version_0" / "checkpoints"
    wait_for_checkpoint(process, checkpoints, "step=0000020.ckpt")
    process.send_signal(signal.SIGTERM)  # torchrun alone: it forwards the signal to each rank
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1  # torchrun's own status after a signal, even though every rank saved
    assert stderr.count("Received SIGTERM: saved step") == 2  # each rank stopped at the same step
    stopped_at = torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"]
    # Where the ranks agreed (signal_check_interval): step 20 itself when the signal lands between that step's
    # save and its agreement check, both at the end of step 20's batch.
    assert 20 <= stopped_at < STEPS and stopped_at % 10 == 0
    finished(torchrun(corpus, prepared, tmp_path, "--ckpt_path", "last"))
    assert scalars_by_step(tmp_path / "quickstart" / "version_0", "train/loss") == reference


def test_a_rank_killed_under_max_restarts_resumes_from_the_newest_checkpoint(
    corpus, prepared: Path, tmp_path: Path, reference: dict[int, float]
) -> None:
    """kill -9 of one rank: torchrun stops the other, starts both again, and --ckpt_path last (in the command
    from the start, where it finds nothing yet) resumes them from the newest complete checkpoint."""
    process = torchrun(corpus, prepared, tmp_path, "--ckpt_path", "last", restarts=1)
    checkpoints = tmp_path / "quickstart" / "version_0" / "checkpoints"
    wait_for_checkpoint(process, checkpoints, "step=0000020.ckpt")
    ranks = [
        int(pid)
        for pid in subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    ]
    assert len(ranks) == 2
    os.kill(ranks[-1], signal.SIGKILL)
    stderr = finished(process)
    resumed = re.findall(r"Resuming \S+ from \S+step=(\d+)\.ckpt", stderr)
    assert len(resumed) == 2 and int(resumed[0]) >= 20  # both restarted ranks, from a checkpoint after the kill's
    assert scalars_by_step(tmp_path / "quickstart" / "version_0", "train/loss") == reference
