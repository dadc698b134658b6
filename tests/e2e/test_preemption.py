"""Preemption signals, Ctrl-C and kill -9 on a real training process with loader workers: it saves, exits
as documented, and resumes exactly. Signals go to the process alone, or to its whole process group as
schedulers, torchrun and terminals send them (tests/e2e/test_torchrun.py: several processes)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.processes import wait_for_checkpoint
from tests.helpers.resume import STEPS, fit_args
from tests.helpers.runs import ROOT, assert_ok, run_main, scalars_by_step


@pytest.fixture(scope="module")
def reference(corpus, prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """Per-step train/loss of the uninterrupted run, in a process of its own like the interrupted ones."""
    logs = tmp_path_factory.mktemp("reference")
    result = run_main(*fit_args(corpus[0], prepared, logs, STEPS), cwd=logs)
    assert_ok(result)
    return scalars_by_step(logs / "quickstart" / "version_0", "train/loss")


def resume_and_compare(corpus, prepared: Path, logs: Path, reference: dict[int, float]) -> None:
    result = run_main(*fit_args(corpus[0], prepared, logs, STEPS, "--ckpt_path", "last"), cwd=logs)
    assert_ok(result)
    assert "Resuming" in result.stderr
    assert sorted(p.name for p in (logs / "quickstart").iterdir()) == ["version_0"]  # same run folder
    assert scalars_by_step(logs / "quickstart" / "version_0", "train/loss") == reference  # bit-exact


def start_training(corpus, prepared: Path, logs: Path) -> subprocess.Popen:
    """The run in a process group of its own (so a group signal reaches it and its loader workers only)."""
    args = [sys.executable, str(ROOT / "main.py"), *fit_args(corpus[0], prepared, logs, STEPS)]
    return subprocess.Popen(
        args,
        cwd=logs,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=as_from_a_terminal,
    )


def as_from_a_terminal() -> None:
    """Ctrl-C as a terminal's foreground job gets it: a suite started in the background passes SIGINT on
    ignored, and a run started that way rightly ignores it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def send(process: subprocess.Popen, signum: signal.Signals, to_group: bool) -> None:
    if to_group:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)


@pytest.mark.parametrize("to_group", [False, True], ids=["to the process", "to its process group"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_preemption_signal_saves_and_exits_cleanly(
    corpus, prepared: Path, tmp_path: Path, reference: dict[int, float], signum: signal.Signals, to_group: bool
) -> None:
    process = start_training(corpus, prepared, tmp_path)
    checkpoints = tmp_path / "quickstart" / "version_0" / "checkpoints"
    wait_for_checkpoint(process, checkpoints, "step=0000020.ckpt")
    send(process, signum, to_group)  # to the group, the loader workers get it too: they leave it to the trainer
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    assert f"Received {signum.name}: saved step" in stderr
    stopped_at = torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"]
    assert 20 < stopped_at < STEPS  # saved where the signal arrived, not at a periodic step
    resume_and_compare(corpus, prepared, tmp_path, reference)


def test_resume_after_kill_9(corpus, prepared: Path, tmp_path: Path, reference: dict[int, float]) -> None:
    process = start_training(corpus, prepared, tmp_path)
    wait_for_checkpoint(process, tmp_path / "quickstart" / "version_0" / "checkpoints", "step=0000020.ckpt")
    process.kill()
    process.communicate()
    resume_and_compare(corpus, prepared, tmp_path, reference)


def test_ctrl_c_saves_and_exits_130(corpus, prepared: Path, tmp_path: Path, reference: dict[int, float]) -> None:
    """A terminal sends SIGINT to the whole foreground process group. (A second Ctrl-C: checkpoints/test_resume.py.)"""
    (tmp_path / "once").mkdir()
    process = start_training(corpus, prepared, tmp_path / "once")
    checkpoints = tmp_path / "once" / "quickstart" / "version_0" / "checkpoints"
    wait_for_checkpoint(process, checkpoints, "step=0000020.ckpt")
    send(process, signal.SIGINT, to_group=True)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    stopped_at = torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"]
    assert 20 < stopped_at < STEPS
    assert f"interrupted: saved step {stopped_at}; continue with --ckpt_path last" in stderr.splitlines()
    resume_and_compare(corpus, prepared, tmp_path / "once", reference)


def test_a_loader_worker_that_dies_fails_the_run_with_one_clear_line(corpus, prepared: Path, tmp_path: Path) -> None:
    process = start_training(corpus, prepared, tmp_path)
    wait_for_checkpoint(process, tmp_path / "quickstart" / "version_0" / "checkpoints", "step=0000020.ckpt")
    deadline = time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline:  # until one dies while it is being read from
        workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):  # one that ended since it was listed
                os.kill(int(worker), signal.SIGKILL)  # as the kernel's out-of-memory killer would
        time.sleep(0.2)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr[-3000:]
    # The command's own error line says it (an escaped exception would end in a traceback, with none). Workers
    # killed while they start or stop can also leave "Exception ignored" notes from Python's clean-up, where
    # PyTorch's SIGCHLD handler fired: noise around the run's end, not its end.
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: DataLoader worker"), stderr[-3000:]
    assert "continue with --ckpt_path last" in errors[0]
