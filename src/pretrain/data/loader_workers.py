"""Loader worker processes and stop signals: only the training process decides when a run stops."""

from __future__ import annotations

import atexit
import ctypes
import multiprocessing
import os
import signal
import sys

# SIGTERM: schedulers and torchrun before a kill; SIGUSR1: SLURM ahead of a requeue; SIGINT: Ctrl-C.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent dies


def leave_stopping_to_the_trainer(worker_id: int) -> None:
    """Loader workers ignore the stop signals: clusters (scancel, torchrun, Kubernetes) and Ctrl-C signal the
    whole process group, and a worker killed mid-epoch would end the run before it could save. The training
    process decides, then stops its workers itself; a worker that dies for another reason still fails the run."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    die_with_the_trainer()


def die_with_the_trainer() -> None:
    """A worker outlives a training process killed outright (``kill -9``, the out-of-memory killer, a lost
    rank): ignoring SIGTERM, it would run on, holding memory and the launcher's output pipes. The kernel is
    asked to kill it when its parent dies (Linux), and it ends at once if the parent died while it started
    (PyTorch's own check compares with the parent it sees first, which would then be init)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        os._exit(1)


def kill_leftover_workers() -> None:
    """At exit, Python stops daemonic children (loader workers) with SIGTERM and waits for them: a worker that
    ignores it and is stuck (a read from a bucket or NFS) would hold the exit until the scheduler's SIGKILL.
    They get SIGKILL at once instead; registered after multiprocessing's own exit step, it runs before it."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


atexit.register(kill_leftover_workers)
