"""Training blocks read straight from a build's chunk files, by block number over one or more splits.

A chunk holds a header (``uint32`` item count ``N``, ``N + 1`` byte offsets) and then its documents' tokens back
to back; block ``j`` of a chunk is its tokens ``[j * L, (j + 1) * L)`` with ``L = seq_len + 1`` (the tail shorter
than a block is left out, as litdata's ``TokensLoader`` does). A block is one ``pread`` of ``L`` tokens: no chunk
is loaded whole, so blocks drawn from anywhere in the build cost what blocks in a row cost.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pretrain.data.shards import split_dtype
from pretrain.errors import UserError

_OPEN_FILES = 64  # chunk files kept open per process


@dataclass(frozen=True)
class ChunkBlocks:
    path: str
    data_offset: int  # bytes before the first token
    blocks: int


def chunk_blocks(split_dir: Path, block_len: int) -> list[ChunkBlocks]:
    """Every chunk of a split with where its tokens start and how many whole blocks it holds."""
    index = json.loads((split_dir / "index.json").read_text())
    return [
        ChunkBlocks(str(split_dir / chunk["filename"]), 4 * (chunk["chunk_size"] + 2), chunk["dim"] // block_len)
        for chunk in index["chunks"]
    ]


class BlockReader(Dataset):
    """Blocks of ``block_len`` tokens from ``splits`` (split folders), numbered split after split, chunk after
    chunk. ``sizes`` holds each split's count; item ``i`` is block ``i`` as a 1-D tensor of the stored dtype."""

    def __init__(self, splits: list[Path], block_len: int) -> None:
        self.block_len = block_len
        dtypes = {split_dtype(split) for split in splits}
        if len(dtypes) != 1:
            raise UserError(f"The splits {splits} store tokens of different types {dtypes}; rebuild them together.")
        self.dtype = dtypes.pop()
        per_split = [chunk_blocks(split, block_len) for split in splits]
        self.sizes = [sum(chunk.blocks for chunk in chunks) for chunks in per_split]
        self.chunks = [chunk for chunks in per_split for chunk in chunks if chunk.blocks]
        empty = [str(split) for split, size in zip(splits, self.sizes, strict=True) if size == 0]
        if empty:
            raise UserError(
                f"{', '.join(empty)} holds fewer than {block_len} tokens in every chunk: no training block of "
                f"data.seq_len + 1 = {block_len} tokens; lower data.seq_len or give it more text."
            )
        self.starts = np.cumsum([0, *(c.blocks for c in self.chunks)]).astype(np.int64)
        self._files: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, block: int) -> torch.Tensor:
        return self.__getitems__([block])[0]

    def __getitems__(self, blocks: list[int]) -> torch.Tensor:
        """A batch of blocks as one ``(len(blocks), block_len)`` tensor, read straight into place."""
        out = np.empty((len(blocks), self.block_len), dtype=self.dtype)
        size = self.block_len * self.dtype.itemsize
        for row, (block, c) in enumerate(
            zip(blocks, np.searchsorted(self.starts, blocks, side="right") - 1, strict=True)
        ):
            chunk = self.chunks[c]
            read = os.preadv(self._file(c), [out[row]], chunk.data_offset + (block - int(self.starts[c])) * size)
            if read != size:
                raise UserError(f"Shard {chunk.path} ends early; run `pretrain prepare --verify` and rebuild it.")
        return torch.from_numpy(out)

    def _file(self, c: int) -> int:
        """An open descriptor of chunk ``c`` (a loader worker opens its own after the fork)."""
        if self._pid != os.getpid():
            self._files, self._pid = OrderedDict(), os.getpid()
        if c in self._files:
            self._files.move_to_end(c)
            return self._files[c]
        if len(self._files) >= _OPEN_FILES:
            os.close(self._files.popitem(last=False)[1])
        self._files[c] = os.open(self.chunks[c].path, os.O_RDONLY)
        return self._files[c]

    def __getstate__(self) -> dict[str, Any]:
        """Sent to loader workers started with spawn: without the descriptors, which each process opens."""
        return {**self.__dict__, "_files": OrderedDict(), "_pid": -1}

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for descriptor in self._files.values():
                os.close(descriptor)
