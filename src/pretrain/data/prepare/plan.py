"""How a corpus is shared out and split: the units processes read, and the split each document goes to.

Both depend only on the files and ``val_fraction``, never on the number of processes, so a build by any
number of processes holds the same documents in the same splits.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from dataclasses import dataclass

from pretrain.data.prepare.readers import RawDocument, Unit, gzip_text_bytes, parquet_row_group_bytes
from pretrain.data.prepare.sources import SourceFile

UNIT_BYTES = 64 * 2**20  # a share of a large file that one process reads: enough work to be worth a hand-off
PIECES_PER_HELD_OUT = 10  # cut files hold at least this many validation pieces: a share within about 10%
PIECE_BYTES = 2**20  # a text file above this is cut into pieces at line breaks: the tokenizer encodes one
# document on one core, so a corpus in one file would be encoded on one core


def unit_hash(key: str) -> float:
    """A number in [0, 1) from ``key`` alone: the same on every machine."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass(frozen=True)
class DocumentSplit:
    """Which split a document goes to: a whole document by a hash of its key; the pieces of cut files
    evenly, one in every ``1 / val_fraction`` counted over the corpus, so even a one-file corpus holds out
    about ``val_fraction`` of its text, spread over it (``plan_units`` makes at least ``PIECES_PER_HELD_OUT
    / val_fraction`` pieces)."""

    val_fraction: float

    def of(self, document: RawDocument) -> str:
        if document.piece is None:
            return "val" if unit_hash(document.key) < self.val_fraction else "train"
        number, fraction = document.piece, self.val_fraction
        return "val" if math.floor((number + 1) * fraction + 0.5) > math.floor(number * fraction + 0.5) else "train"


def must_cut_for_the_split(files: list[SourceFile], val_fraction: float) -> bool:
    """Whether whole text files would give a validation share far from ``val_fraction`` (a one-file corpus,
    or a few files of very different sizes), so every text file is cut into pieces instead."""
    if not files or any(file.format != "text" for file in files):
        return False  # JSONL and Parquet hold many documents each: the hash split is close enough
    total = sum(file.size for file in files)
    held_out = sum(
        val_fraction * file.size if file.size > PIECE_BYTES else file.size * (unit_hash(file.key) < val_fraction)
        for file in files
    )
    return not val_fraction / 2 <= held_out / total <= 2 * val_fraction


def plan_units(files: list[SourceFile], val_fraction: float) -> list[Unit]:
    """Every file's shares, in file order."""
    cut_all = must_cut_for_the_split(files, val_fraction)
    cut = {file.path: file.size for file in files if file.format == "text" and (cut_all or file.size > PIECE_BYTES)}
    # One piece size for every cut file, small enough that validation gets its share of them.
    step = max(1, min(PIECE_BYTES, math.ceil(sum(cut.values()) * val_fraction / PIECES_PER_HELD_OUT)))
    units, pieces_before = [], 0
    for file in files:
        if file.format == "parquet":
            groups = parquet_row_group_bytes(file.path)  # uncompressed: what sampling and buckets count
            units += [
                Unit(file.path, file.key, g, g + 1, file.size // len(groups), text_bytes=size)
                for g, size in enumerate(groups)
            ]
        elif file.format == "jsonl" and not file.path.lower().endswith(".gz"):
            units += [
                Unit(file.path, file.key, start, min(start + UNIT_BYTES, file.size), min(UNIT_BYTES, file.size - start))
                for start in range(0, file.size, UNIT_BYTES)
            ]
        elif file.path in cut:
            pieces, per_unit = math.ceil(file.size / step), max(1, UNIT_BYTES // step)
            units += [
                Unit(
                    file.path,
                    file.key,
                    first,
                    min(first + per_unit, pieces),
                    min((first + per_unit) * step, file.size) - first * step,
                    step,
                    pieces_before,
                )
                for first in range(0, pieces, per_unit)
            ]
            pieces_before += pieces
        elif file.format == "jsonl":  # gzipped: it cannot be entered in the middle
            units.append(Unit(file.path, file.key, 0, 1, file.size, text_bytes=gzip_text_bytes(file.path, file.size)))
        else:  # a whole text file
            units.append(Unit(file.path, file.key, 0, 1, file.size))
    return units


def share_out(units: list[Unit], processes: int) -> list[list[int]]:
    """Unit numbers for each process, about the same bytes each (largest first, to the least loaded)."""
    loads = [(0, rank) for rank in range(processes)]
    shares: list[list[int]] = [[] for _ in range(processes)]
    for number in sorted(range(len(units)), key=lambda n: (-units[n].text_size, n)):
        load, rank = heapq.heappop(loads)
        shares[rank].append(number)
        heapq.heappush(loads, (load + units[number].text_size, rank))
    return [sorted(share) for share in shares]
