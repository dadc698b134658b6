"""Processes a test starts and stops: waiting for a checkpoint, killing a run with its children."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest


def wait_for_checkpoint(process: subprocess.Popen, checkpoints: Path, name: str, timeout: float = 120) -> None:
    """Block until ``last.ckpt`` points at ``name`` (the save and the link are both done)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        last = checkpoints / "last.ckpt"
        if last.is_symlink() and os.readlink(last) == name:
            return
        time.sleep(0.02)
    kill_with_its_children(process)
    pytest.fail(f"no {name} appeared; output: {process.communicate(timeout=60)[1][-3000:]}")


def kill_with_its_children(process: subprocess.Popen) -> None:
    """kill -9 the process and what it started (torchrun's ranks, loader workers): an orphan left running
    holds the output pipes open, and reading them would then wait for it instead of failing the test."""
    descendants, parents = [], [process.pid]
    while parents:
        listed = subprocess.run(["pgrep", "-P", ",".join(map(str, parents))], capture_output=True, text=True)
        parents = [int(pid) for pid in listed.stdout.split()]
        descendants += parents
    for pid in [process.pid, *descendants]:
        with contextlib.suppress(ProcessLookupError):  # one that ended since it was listed
            os.kill(pid, signal.SIGKILL)
