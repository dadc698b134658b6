"""Checkpoint writes in the background: the step loop waits only for the copy of the state to host memory.

One thread writes the checkpoints and then does what must wait for a write (pointing ``last`` at it, removing
the checkpoint it replaces), in the order they were asked for. At most one save is in flight: a save waits
for the previous one's write first. A ``kill -9`` during a write leaves the previous checkpoint, and ``last``
pointing at it, as they were; the end of a run and a preemption signal wait for the write (``wait``).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch


class BackgroundWrites:
    """A queue of checkpoint writes and their follow-ups, run in order by one thread. Once one fails, nothing
    queued after it runs (the checkpoint it would replace stays, and ``last`` keeps pointing at it)."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-write")
        self._queued: list[Future] = []
        self._failure: BaseException | None = None

    def submit(self, work: Callable[[], Any]) -> None:
        """Run ``work`` after everything submitted before it, unless something before it failed."""

        def unless_failed() -> None:
            if self._failure is not None:
                return
            try:
                work()
            except BaseException as error:
                self._failure = error

        self._queued.append(self._executor.submit(unless_failed))

    def after_writes(self, work: Callable[[], Any]) -> None:
        """Run ``work`` once the writes submitted so far are done: now, where none is."""
        if any(not future.done() for future in self._queued):
            self.submit(work)
        else:
            self.wait()
            work()

    def wait(self) -> None:
        """Wait for everything submitted; a write that failed raises here, in the training thread, once."""
        queued, self._queued = self._queued, []
        for future in queued:
            future.result()
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure


def host_copy(state: Any) -> Any:
    """``state`` with every tensor copied to host memory: training goes on changing the originals in place."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {key: host_copy(value) for key, value in state.items()}
    if type(state) in (list, tuple):  # a named tuple's fields stay as they are
        return type(state)(host_copy(value) for value in state)
    return state
