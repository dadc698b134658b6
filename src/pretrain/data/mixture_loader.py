"""Training batches drawn from a mixture's datasets in fixed proportions, resumable to the exact sample."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from typing import Any

import torch
from litdata import StreamingDataLoader

from pretrain.errors import UserError

log = logging.getLogger(__name__)


class MixtureLoader:
    """Micro-batches drawn from several datasets in fixed proportions, resumable to the exact sample.

    Sample ``i`` comes from the dataset furthest behind its share (the largest ``share * i - taken``),
    so every stretch of samples holds each dataset in proportion, off by at most one sample, with
    no randomness to replay. Each dataset streams through its own loader and starts its next,
    reshuffled epoch when it runs out, independently of the others: the mixture never ends, and
    training length is ``trainer.max_steps``.

    The checkpointed state is the one after the last batch handed out, not after the batch
    Lightning fetches ahead: each dataset's loader position plus the samples fetched but not yet
    used, so a resumed run continues with exactly the batches the uninterrupted one would see.
    Positions are the same on every rank, the unused samples are not: those are kept per rank.
    """

    def __init__(self, loaders: dict[str, StreamingDataLoader], shares: dict[str, float], batch_size: int) -> None:
        self.names = list(loaders)
        self.loaders = [loaders[name] for name in self.names]
        self.shares = [shares[name] for name in self.names]
        self.batch_size = batch_size
        self._taken = [0] * len(self.names)  # samples used from each dataset so far
        self._buffers: list[list[torch.Tensor]] = [[] for _ in self.names]  # fetched, not used yet
        self._iterators: list[Iterator | None] = [None] * len(self.names)
        # A loader's state as loaded from a checkpoint, until it is iterated again: asking litdata for
        # the state of a restored loader before that overwrites the restored epoch.
        self._restored: list[dict[str, Any] | None] = [None] * len(self.names)
        self._state_before_prefetch: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            self._state_before_prefetch = self._state()
            samples = []
            for _ in range(self.batch_size):
                k = self._furthest_behind()
                if not self._buffers[k]:
                    self._buffers[k] = list(self._next_batch(k).unbind(0))
                samples.append(self._buffers[k].pop(0))
                self._taken[k] += 1
            yield torch.stack(samples)

    def close(self) -> None:
        """Stop every dataset's loader workers (dropping an iterator shuts its workers down)."""
        self._iterators = [None] * len(self.names)

    def _furthest_behind(self) -> int:
        position = sum(self._taken) + 1
        return max(range(len(self.names)), key=lambda k: self.shares[k] * position - self._taken[k])

    def _next_batch(self, k: int) -> torch.Tensor:
        if self._iterators[k] is None:
            self._iterators[k], self._restored[k] = iter(self.loaders[k]), None
        try:
            return next(self._iterators[k])
        except StopIteration:  # this dataset's epoch is over: its next one, reshuffled
            self._iterators[k] = iter(self.loaders[k])
            try:
                return next(self._iterators[k])
            except StopIteration:
                raise UserError(
                    f"Mixture dataset {self.names[k]!r} holds fewer samples than one batch of {self.batch_size} "
                    "per loader worker; lower data.batch_size or data.num_workers, or give it more text."
                ) from None

    def _state(self) -> dict[str, Any]:
        return {
            name: {
                "loader": copy.deepcopy(self._restored[k] or self.loaders[k].state_dict()),
                "taken": self._taken[k],
                "buffer": torch.stack(self._buffers[k]) if self._buffers[k] else None,
            }
            for k, name in enumerate(self.names)
        }

    def state_dict(self) -> dict[str, Any]:
        """Called on every rank at once, as Lightning builds a checkpoint on every rank (and writes
        rank 0's): the samples each rank fetched but has not used are gathered from all of them."""
        state = self._state_before_prefetch or self._state()
        # As numpy arrays: gathering objects that hold tensors fails (torch 2.14, gloo).
        ours = {name: None if part["buffer"] is None else part["buffer"].numpy() for name, part in state.items()}
        by_rank = [
            {name: None if array is None else torch.from_numpy(array) for name, array in buffers.items()}
            for buffers in _gather_from_ranks(ours)
        ]
        return {name: {**part, "buffer": [buffers[name] for buffers in by_rank]} for name, part in state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(self.names):
            raise UserError(
                f"The checkpoint was trained on the mixture {sorted(state)}, this run mixes {sorted(self.names)}; "
                "resume with the same data.mixture names."
            )
        rank, world_size = _rank_and_world_size()
        buffers = {name: _per_rank(state[name]["buffer"]) for name in self.names}
        saved_by = len(buffers[self.names[0]])
        if saved_by != world_size and rank == 0:
            log.warning(
                "This mixture run was saved by %d process(es) and resumes on %d: the samples each had fetched "
                "but not yet used are skipped, and the data order differs from an uninterrupted run.",
                saved_by,
                world_size,
            )
        for k, name in enumerate(self.names):
            self._restored[k] = copy.deepcopy(state[name]["loader"])
            self.loaders[k].load_state_dict(copy.deepcopy(state[name]["loader"]))  # litdata edits what it is given
            self._taken[k] = state[name]["taken"]
            buffer = buffers[name][rank] if saved_by == world_size else None
            self._buffers[k] = [] if buffer is None else list(buffer.unbind(0))
            self._iterators[k] = None
        self._state_before_prefetch = None


def _per_rank(buffer: list[torch.Tensor | None] | torch.Tensor | None) -> list[torch.Tensor | None]:
    """A checkpoint's unused samples of one dataset, per rank; older checkpoints held one process's alone."""
    return buffer if isinstance(buffer, list) else [buffer]


def _rank_and_world_size() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gather_from_ranks(value: Any) -> list[Any]:
    """``value`` from every rank, in rank order (a collective: every rank must call it)."""
    world_size = _rank_and_world_size()[1]
    if world_size == 1:
        return [value]
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, value)
    return gathered
