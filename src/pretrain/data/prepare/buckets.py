"""A mixed stream without holding the corpus in memory: documents are dealt to buckets by a hash of their
text as they are encoded, then each bucket is written in hash order, a pseudo-random order independent of
where a document came from. Every chunk is then a sample of every source in proportion, and exact
duplicates meet in the same bucket, next to each other, where they are dropped.

On disk, per process: ``<split>-<bucket>.tokens`` (the documents' token ids, appended) and
``<split>-<bucket>.docs`` (one row per document, below). A bucket is read whole, so its size bounds memory.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path

import numpy as np

DOCUMENT = np.dtype([("hash", "<u8"), ("check", "<u8"), ("unit", "<u4"), ("ordinal", "<u4"), ("length", "<u8")])


def text_hash(text: str) -> tuple[int, int]:
    """128 bits of the text's hash, as two numbers: the first picks the bucket and the order."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")


class BucketFiles:
    """This process's part of every bucket, appended to as documents are encoded."""

    def __init__(self, folder: Path, buckets: int, dtype: str) -> None:
        self.folder, self.buckets, self.dtype = folder, buckets, np.dtype(dtype)
        folder.mkdir(parents=True, exist_ok=True)
        self._pending: dict[tuple[str, int], tuple[list[np.ndarray], list[tuple]]] = defaultdict(lambda: ([], []))

    def add(self, split: str, text: str, unit: int, ordinal: int, ids: np.ndarray) -> None:
        """``ordinal``: the document's place in its unit; with ``unit`` it breaks ties between duplicates."""
        high, low = text_hash(text)
        tokens, rows = self._pending[(split, high % self.buckets)]
        tokens.append(ids)
        rows.append((high, low, unit, ordinal, len(ids)))

    def flush(self) -> None:
        for (split, bucket), (tokens, rows) in self._pending.items():
            with open(self.folder / f"{split}-{bucket}.tokens", "ab") as out:
                np.concatenate(tokens).astype(self.dtype, copy=False).tofile(out)
            with open(self.folder / f"{split}-{bucket}.docs", "ab") as out:
                np.array(rows, dtype=DOCUMENT).tofile(out)
        self._pending.clear()


def _rows(folders: list[Path], split: str, bucket: int) -> list[np.ndarray]:
    return [
        np.fromfile(folder / f"{split}-{bucket}.docs", dtype=DOCUMENT)
        for folder in folders
        if (folder / f"{split}-{bucket}.docs").is_file()
    ]


def _read_into_one_array(paths: list[Path], dtype: str) -> np.ndarray:
    """The files' contents end to end, read straight into one array (no second copy while joining them)."""
    present = [path for path in paths if path.is_file()]
    array = np.empty(sum(path.stat().st_size for path in present) // np.dtype(dtype).itemsize, dtype=dtype)
    view, filled = memoryview(array).cast("B"), 0
    for path in present:
        with open(path, "rb") as file:
            filled += file.readinto(view[filled:])
    return array


class Bucket:
    """One bucket of one split, gathered from every process's part."""

    def __init__(self, folders: list[Path], split: str, bucket: int, dtype: str) -> None:
        parts = _rows(folders, split, bucket)
        self.rows = np.concatenate(parts) if parts else np.empty(0, dtype=DOCUMENT)
        self.tokens = _read_into_one_array([folder / f"{split}-{bucket}.tokens" for folder in folders], dtype)
        self.starts = np.concatenate(([0], np.cumsum(self.rows["length"], dtype=np.int64)[:-1])).astype(np.int64)

    def document(self, row: int) -> np.ndarray:
        start = int(self.starts[row])
        return self.tokens[start : start + int(self.rows["length"][row])]

    def order(self, held_out: np.ndarray | None = None) -> tuple[np.ndarray, int]:
        """Rows in hash order, each text once and none of ``held_out``'s texts; and how many were dropped."""
        order = np.lexsort((self.rows["ordinal"], self.rows["unit"], self.rows["check"], self.rows["hash"]))
        ranked = self.rows[order]
        repeated = np.zeros(len(order), dtype=bool)
        repeated[1:] = (ranked["hash"][1:] == ranked["hash"][:-1]) & (ranked["check"][1:] == ranked["check"][:-1])
        if held_out is not None and len(held_out):
            elsewhere = {(int(h), int(c)) for h, c in zip(held_out["hash"], held_out["check"], strict=True)}
            candidates = np.flatnonzero(np.isin(ranked["hash"], held_out["hash"]))
            for i in candidates:
                repeated[i] |= (int(ranked["hash"][i]), int(ranked["check"][i])) in elsewhere
        return order[~repeated], int(repeated.sum())


def held_out_rows(folders: list[Path], bucket: int) -> np.ndarray:
    """The validation documents of a bucket (their hashes): a training copy of one is dropped."""
    parts = _rows(folders, "val", bucket)
    return np.concatenate(parts) if parts else np.empty(0, dtype=DOCUMENT)
