"""The training loader: this process's batches of the global block stream, resumable on any number of processes.

Lightning saves a loader's ``state_dict`` in every checkpoint and gives it back before iterating on resume. Here
the state is the global stream's (``block_order``): the same on every process, so it fits any layout. The loader
has a length (the build's blocks over one step's blocks), so Lightning fetches no batch ahead of the one it trains
on, and the state after the last batch handed out is the state to save. Loader workers read blocks the main
process chose: the order never depends on how many workers there are.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from pretrain.data.block_order import BlockStream, StreamState
from pretrain.data.block_reader import BlockReader
from pretrain.data.identity import stream_change
from pretrain.errors import UserError

log = logging.getLogger(__name__)


def already_a_batch(batch: torch.Tensor) -> torch.Tensor:
    """The reader returns whole batches (``BlockReader.__getitems__``): nothing to collate."""
    return batch


class _Rounds(Sampler):
    """Batches of block numbers for one process: round after round of the stream from ``state``. The state after
    each batch is queued in ``after``, since the loader draws batches ahead of the ones handed out."""

    def __init__(
        self, stream: BlockStream, state: StreamState, layout: tuple[int, int, int], after: collections.deque
    ) -> None:
        self.stream, self.state, self.after = stream, state, after
        self.rank, self.processes, self.batch_size = layout

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
            blocks, self.state = self.stream.take(self.state, self.processes * self.batch_size, mine)
            self.after.append(self.state)
            yield blocks.tolist()


class BlockLoader:
    """Batches of ``batch_size`` blocks for process ``rank`` of ``processes``, drawn from the global stream.

    ``identity``: what the position means (build, tokenizer, block length, seed, datasets). A checkpoint whose
    identity differs is refused with the change named, unless ``allow_new_stream``: then the stream starts over.
    """

    def __init__(
        self,
        reader: BlockReader,
        stream: BlockStream,
        batch_size: int,
        rank: int,
        processes: int,
        identity: dict[str, Any],
        num_workers: int = 0,
        pin_memory: bool = False,
        worker_init_fn: Callable[[int], None] | None = None,
        allow_new_stream: bool = False,
    ) -> None:
        self.reader, self.stream, self.batch_size = reader, stream, batch_size
        self.rank, self.processes = rank, processes
        self.identity, self.allow_new_stream = identity, allow_new_stream
        self.num_workers, self.pin_memory, self.worker_init_fn = num_workers, pin_memory, worker_init_fn
        self.state = stream.start()
        self._source: tuple[Iterator[torch.Tensor], collections.deque] | None = None

    def __len__(self) -> int:
        """Batches per pass over the build: an iterator's length (Lightning's epoch). The next iterator goes on
        where this one stopped, into the stream's next pass when it gets there."""
        return max(1, len(self.reader) // (self.processes * self.batch_size))

    def __iter__(self) -> Iterator[torch.Tensor]:
        """One pass's worth of batches, from where the last iterator stopped. The loader workers live on from one
        iterator to the next (Lightning's epochs), with the batches they drew ahead."""
        for _ in range(len(self)):
            if self._source is None:
                self._source = self._start()
            batch = next(self._source[0])  # no local holds the source: close() alone ends its workers
            self.state = self._source[1].popleft()
            yield batch

    def _start(self) -> tuple[Iterator[torch.Tensor], collections.deque]:
        """Loader workers reading the stream's batches for this process from ``self.state`` on."""
        after: collections.deque = collections.deque()
        rounds = _Rounds(self.stream, self.state, (self.rank, self.processes, self.batch_size), after)
        loader = DataLoader(
            self.reader,
            batch_sampler=rounds,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            worker_init_fn=self.worker_init_fn,
            collate_fn=already_a_batch,
        )
        return iter(loader), after

    def close(self) -> None:
        """Stop the loader workers (Lightning stops at a step count and never finishes an iterator)."""
        self._source = None

    def state_dict(self) -> dict[str, Any]:
        return {**self.state.as_dict(), **self.identity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        change = stream_change(state, self.identity)
        self.close()  # batches drawn ahead from the old position are dropped
        if change is None:
            self.state = StreamState(int(state["position"]), [int(n) for n in state["taken"]])
        elif self.allow_new_stream:
            log.warning("%s: data.allow_new_build is set, so the data stream starts over.", change)
            self.state = self.stream.start()
        else:
            raise UserError(
                f"{change}. Resume with the data it was trained on, or set --data.allow_new_build true to go on "
                "with this data from the start of its stream."
            )
