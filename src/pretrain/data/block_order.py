"""The order of the training stream: blocks drawn from the whole build, one global sequence for every layout.

A build's training blocks (``seq_len + 1`` tokens each) are numbered over all its chunks. Each pass over a dataset
visits its blocks in a seeded pseudo-random permutation (a Feistel network over the block numbers, walked until it
lands inside the range), so any stretch of the stream is a draw from the whole corpus, not from one chunk, and a
position maps to its block in O(1) memory however large the build. Every pass has its own permutation.

The stream is global: its entries are consumed ``processes x batch_size`` at a time, process ``r`` taking the
``r``-th run of ``batch_size``. Its state is a position and, for a mixture, how many samples each dataset gave, the
same on every process, so a run resumes on any number of processes with every block trained once.

A mixture's datasets take turns by weight: dataset ``k``'s ``m``-th sample is due at ``(m + 0.5) / share_k`` and the
stream takes samples in the order they fall due, so every stretch holds each dataset in proportion (off by at most
one sample each), with no randomness to replay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

_ROUNDS = 6
_GOLDEN = 0x9E3779B97F4A7C15
_MASK = 2**64 - 1


def _mix(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: a well-spread 64-bit hash of each value (uint64 arithmetic wraps)."""
    x = values.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def stream_key(*parts: int) -> int:
    """One 64-bit key from integers (seed, dataset, pass): the same on every machine."""
    key = 0
    for part in parts:
        key = int(_mix(np.array([(key ^ part) + _GOLDEN & _MASK], dtype=np.uint64))[0])
    return key


class BlockPermutation:
    """A seeded permutation of ``range(size)``, evaluated at any positions without building it."""

    def __init__(self, size: int, key: int) -> None:
        if size < 1:
            raise ValueError(f"a permutation of {size} elements")
        self.size = size
        self.half_bits = max(1, math.ceil(max(1, size - 1).bit_length() / 2))
        self.half_mask = np.uint64(2**self.half_bits - 1)
        self.round_keys = [np.uint64(stream_key(key, r)) for r in range(_ROUNDS)]

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """The blocks at ``positions`` (each in ``range(size)``): distinct positions give distinct blocks."""
        out = self._encrypt(np.asarray(positions, dtype=np.uint64))
        outside = out >= self.size
        while outside.any():  # cycle-walking: the network permutes [0, 4**half_bits), at most 4x the range
            out[outside] = self._encrypt(out[outside])
            outside = out >= self.size
        return out.astype(np.int64)

    def _encrypt(self, values: np.ndarray) -> np.ndarray:
        shift = np.uint64(self.half_bits)
        left, right = values >> shift, values & self.half_mask
        for round_key in self.round_keys:
            left, right = right, left ^ (_mix(right ^ round_key) & self.half_mask)
        return (left << shift) | right


@dataclass
class StreamState:
    """Where the global stream stands: entries consumed in all, and samples given by each dataset."""

    position: int = 0
    taken: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"position": self.position, "taken": list(self.taken)}


class BlockStream:
    """The global sequence of training blocks over one or more datasets (``sizes``: blocks of each).

    Entry ``i`` of the stream is a block number over the concatenated datasets: dataset ``k``'s blocks are
    ``offsets[k] ... offsets[k] + sizes[k] - 1``.
    """

    def __init__(self, sizes: list[int], shares: list[float], seed: int) -> None:
        if len(sizes) != len(shares) or not sizes:
            raise ValueError("one share per dataset")
        self.sizes, self.shares, self.seed = list(sizes), list(shares), seed
        self.offsets = np.cumsum([0, *self.sizes[:-1]]).astype(np.int64)
        self._permutations: dict[tuple[int, int], BlockPermutation] = {}

    def start(self) -> StreamState:
        return StreamState(0, [0] * len(self.sizes))

    def take(self, state: StreamState, count: int, part: slice = slice(None)) -> tuple[np.ndarray, StreamState]:
        """The blocks of entries ``part`` of the next ``count`` from ``state``, and the state after all ``count``.
        A process asks only for its own part of a step: the others' blocks are never computed."""
        datasets, samples = self._next_samples(state.taken, count)
        taken = [n + int((datasets == k).sum()) for k, n in enumerate(state.taken)]
        datasets, samples = datasets[part], samples[part]
        blocks = np.empty(len(samples), dtype=np.int64)
        for k in np.unique(datasets):
            mine = datasets == k
            blocks[mine] = self.offsets[k] + self._blocks_of(int(k), samples[mine])
        return blocks, StreamState(state.position + count, taken)

    def _next_samples(self, taken: list[int], count: int) -> tuple[np.ndarray, np.ndarray]:
        """Which dataset each of the next ``count`` entries comes from, and its sample number there."""
        if len(self.sizes) == 1:
            return np.zeros(count, dtype=np.int64), taken[0] + np.arange(count, dtype=np.int64)
        offsets = np.arange(count, dtype=np.int64)
        samples = np.concatenate([taken[k] + offsets for k in range(len(self.sizes))])
        datasets = np.repeat(np.arange(len(self.sizes), dtype=np.int64), count)
        due = (samples + 0.5) / np.repeat(np.asarray(self.shares, dtype=np.float64), count)
        first = np.lexsort((datasets, due))[:count]  # by due time, ties to the dataset listed first
        return datasets[first], samples[first]

    def _blocks_of(self, k: int, samples: np.ndarray) -> np.ndarray:
        """Dataset ``k``'s blocks for its sample numbers: pass ``m // size``, place ``m % size`` in that pass."""
        passes, places = np.divmod(samples, self.sizes[k])
        blocks = np.empty_like(samples)
        for number in np.unique(passes):
            inside = passes == number
            blocks[inside] = self._permutation(k, int(number))(places[inside])
        return blocks

    def _permutation(self, k: int, number: int) -> BlockPermutation:
        if (k, number) not in self._permutations:
            if len(self._permutations) > 8:  # passes only move forward: keep the latest few
                self._permutations.clear()
            self._permutations[(k, number)] = BlockPermutation(self.sizes[k], stream_key(self.seed, k, number))
        return self._permutations[(k, number)]
