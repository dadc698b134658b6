"""Read prepared shards back as documents, for checks and tests (training streams them via litdata)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pretrain._compat import numpy_dtype_of_code
from pretrain.errors import UserError

# litdata chunk layout: uint32 item count N, uint32 byte offsets[N + 1], then the items' bytes.
_HEADER_DTYPE = np.uint32


def split_dtype(split_dir: Path) -> np.dtype:
    """Token dtype recorded in the split's index (e.g. ``no_header_numpy:5`` -> uint16)."""
    config = json.loads((split_dir / "index.json").read_text())["config"]
    return np.dtype(numpy_dtype_of_code(int(config["data_format"][0].split(":")[1])))


def verify_split(split_dir: str | Path) -> None:
    """Check every chunk is present, whole and self-consistent; name the first one that is not.

    Reads only sizes and chunk headers, so it is cheap enough to run before every training run.
    """
    split_dir = Path(split_dir)
    rebuild = f"Remove {split_dir.parent / 'manifest.json'} and run again: the shards are rebuilt from the sources."
    index = split_dir / "index.json"
    if not index.is_file():
        raise UserError(f"{index} is missing. {rebuild}")
    for chunk in json.loads(index.read_text())["chunks"]:
        path = split_dir / chunk["filename"]
        if not path.is_file():
            raise UserError(f"Shard {path} is missing. {rebuild}")
        size = path.stat().st_size
        if size != chunk["chunk_bytes"]:
            raise UserError(
                f"Shard {path} is truncated or corrupted ({size} bytes, expected {chunk['chunk_bytes']}). {rebuild}"
            )
        header = np.fromfile(path, dtype=_HEADER_DTYPE, count=chunk["chunk_size"] + 2)
        if header[0] != chunk["chunk_size"] or header[-1] != size:
            raise UserError(f"Shard {path} is corrupted (its header does not match index.json). {rebuild}")


def iter_chunks(split_dir: str | Path) -> Iterator[list[np.ndarray]]:
    """Every chunk's documents (token ids, end-of-text included), in stored order."""
    split_dir = Path(split_dir)
    dtype = split_dtype(split_dir)
    for chunk in json.loads((split_dir / "index.json").read_text())["chunks"]:
        raw = np.fromfile(split_dir / chunk["filename"], dtype=np.uint8)
        count = int(raw[:4].view(_HEADER_DTYPE)[0])
        offsets = raw[4 : 4 * (count + 2)].view(_HEADER_DTYPE)
        yield [raw[start:end].view(dtype) for start, end in itertools.pairwise(offsets)]


def iter_documents(split_dir: str | Path) -> Iterator[np.ndarray]:
    """Every document's token ids (end-of-text included), chunk by chunk, in stored order."""
    for documents in iter_chunks(split_dir):
        yield from documents
