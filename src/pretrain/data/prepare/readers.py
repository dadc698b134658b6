"""Read the documents inside one share of a source file (a ``Unit``): a text file is one document (or
pieces cut at line boundaries), JSONL one per line, Parquet one per row.

Shares let several processes read one large file: a byte range of a JSONL file, a run of pieces of a
cut text file, a row group of a Parquet file. Every document gets a key that does not depend on how the
file was shared out (its byte offset or row number), so any number of processes builds the same shards.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from pretrain.data.prepare.url_sources import is_url, open_url, url_size
from pretrain.errors import UserError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
SCAN_BYTES = 65536
UTF8_BOM = b"\xef\xbb\xbf"  # some editors start a file with it; not part of the first record
LONGEST_LINE = 16 * 2**20  # a piece ends at a line break unless the line is longer than this


def file_format(path: str | Path) -> str:
    """``jsonl``, ``parquet`` or ``text`` (any other file named explicitly is read as text)."""
    name = str(path).lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def has_supported_suffix(path: Path) -> bool:
    return path.name.lower().endswith(SUPPORTED_SUFFIXES)


@dataclass(frozen=True)
class Unit:
    """A share of one file that one process reads alone.

    ``start``/``stop``: a byte range (JSONL: the lines that begin inside it), piece numbers (a text file cut
    into pieces of ``piece_bytes``), or row groups (Parquet); a whole file is ``0, 1``.
    ``size``: the bytes of the file this share stands for, for progress and for sharing work out.
    """

    path: str
    key: str
    start: int
    stop: int
    size: int
    piece_bytes: int = 0
    first_piece: int = 0  # the corpus-wide number of this file's first piece
    text_bytes: int = 0  # the text it holds, uncompressed (0: ``size``); sampling and buckets count it

    @property
    def text_size(self) -> int:
        return self.text_bytes or self.size

    @property
    def format(self) -> str:
        return file_format(self.path)


@dataclass(frozen=True)
class RawDocument:
    """One document's text, or None when its record was unusable (malformed JSON, no text field).

    ``key`` names it within the corpus: the file's key, plus ``@<byte offset>`` for a JSONL line or a piece
    of a cut text file, ``#<row>`` for a Parquet row. ``piece``: a piece's number, counted over the corpus.
    ``read``: bytes of the unit read so far, for progress.
    """

    key: str
    text: str | None
    replaced_invalid_utf8: bool = False
    piece: int | None = None
    read: int = 0


# Half of a UTF-16 pair on its own, as JSON escapes like "\\ud800" produce: not text, and refused by the tokenizer.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def decode_text(data: bytes) -> tuple[str, bool]:
    """(text, whether any invalid UTF-8 had to be replaced by U+FFFD)."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


def open_binary(path: str) -> BinaryIO:
    """A local file, or a remote one (``s3://...``) through fsspec."""
    return open_url(path) if is_url(path) else open(path, "rb")


def file_size(path: str) -> int:
    return url_size(path) if is_url(path) else Path(path).stat().st_size


def read_unit(unit: Unit, text_field: str, wanted: Callable[[str], bool] | None = None) -> Iterator[RawDocument]:
    """Every document of the share, in file order; with ``wanted``, only those whose key it accepts (JSONL
    lines that are not wanted are not even parsed)."""
    if unit.format == "jsonl":
        documents = _jsonl_documents(unit, text_field, wanted)
    elif unit.format == "parquet":
        documents = _parquet_documents(unit, text_field)
    elif unit.piece_bytes:
        documents = _text_pieces(unit)
    else:
        with open_binary(unit.path) as file:
            documents = iter([RawDocument(unit.key, *decode_text(file.read()), read=unit.size)])
    try:
        for document in documents:
            if wanted is None or wanted(document.key):
                yield document
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:  # a download cut short, or not gzip at all
        raise UserError(
            f"{unit.path} cannot be read to its end ({type(error).__name__}: {error}): it is damaged or cut short. "
            "Fetch it again, or leave it out of data.sources."
        ) from None


def piece_start(file: BinaryIO, position: int, size: int, search: int) -> int:
    """Where a piece that should start near ``position`` starts: at the first line start at or after it, or,
    when no line ends within ``search`` bytes, at ``position`` moved off any UTF-8 continuation byte."""
    if position <= 0 or position >= size:
        return min(max(position, 0), size)
    file.seek(position - 1)
    scanned = 0
    while scanned <= search:
        block = file.read(SCAN_BYTES)
        newline = block.find(b"\n")
        if newline >= 0:
            return min(position + scanned + newline, size)
        if len(block) < SCAN_BYTES:
            return size  # the last line runs to the end of the file
        scanned += len(block)
    file.seek(position)
    head = file.read(4)
    return min(position + next((i for i, byte in enumerate(head) if byte & 0xC0 != 0x80), len(head)), size)


def _text_pieces(unit: Unit) -> Iterator[RawDocument]:
    size, step = file_size(unit.path), unit.piece_bytes
    with open_binary(unit.path) as file:
        begin = piece_start(file, unit.start * step, size, LONGEST_LINE)
        first = begin
        for number in range(unit.start, unit.stop):
            end = piece_start(file, (number + 1) * step, size, LONGEST_LINE)
            if end > begin:  # a line longer than a piece leaves the next piece empty
                file.seek(begin)
                text, replaced = decode_text(file.read(end - begin))
                yield RawDocument(f"{unit.key}@{begin}", text, replaced, unit.first_piece + number, end - first)
            begin = end


def _jsonl_documents(unit: Unit, text_field: str, wanted: Callable[[str], bool] | None) -> Iterator[RawDocument]:
    compressed = unit.path.lower().endswith(".gz")
    with open_binary(unit.path) as raw, gzip.open(raw) if compressed else raw as lines:
        position = unit.start
        if position > 0:  # the line running across the start belongs to the share before
            lines.seek(position - 1)
            position += len(lines.readline()) - 1
        while compressed or position < unit.stop:
            line = lines.readline()
            if not line:
                break
            key, position = f"{unit.key}@{position}", position + len(line)
            read = raw.tell() if compressed else position - unit.start
            if not line.strip():
                continue  # blank lines separate nothing
            if wanted is not None and not wanted(key):
                yield RawDocument(key, None, read=read)  # dropped by read_unit, unparsed
                continue
            text, replaced = decode_text(line.removeprefix(UTF8_BOM) if key.endswith("@0") else line)
            try:
                value = json.loads(text)[text_field]
            except (ValueError, KeyError, TypeError):
                value = None
            if isinstance(value, str) and LONE_SURROGATE.search(value):
                value, replaced = LONE_SURROGATE.sub("\ufffd", value), True
            yield RawDocument(key, value if isinstance(value, str) else None, replaced, read=read)


def _parquet_documents(unit: Unit, text_field: str) -> Iterator[RawDocument]:
    with open_binary(unit.path) as raw, pq.ParquetFile(raw) as file:
        row = sum(file.metadata.row_group(group).num_rows for group in range(unit.start))
        for group in range(unit.start, unit.stop):
            column = file.read_row_group(group, columns=[text_field]).column(0)
            if pa.types.is_dictionary(column.type):
                column = column.cast(column.type.value_type)
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                # As bytes: invalid UTF-8 inside a string column is repaired like any other, not raised on.
                column = column.cast(pa.large_binary())
            for value in column.to_pylist():
                if isinstance(value, bytes):
                    yield RawDocument(f"{unit.key}#{row}", *decode_text(value))
                else:
                    yield RawDocument(f"{unit.key}#{row}", value if isinstance(value, str) else None)
                row += 1
        # Progress for a row group is counted once it is done (see the unit's size).


def parquet_row_group_bytes(path: str) -> list[int]:
    """Uncompressed bytes of each row group (from the file's footer)."""
    with open_binary(path) as raw, pq.ParquetFile(raw) as file:
        return [file.metadata.row_group(g).total_byte_size for g in range(file.metadata.num_row_groups)]


def gzip_text_bytes(path: str, size: int) -> int:
    """The uncompressed size a gzip file records in its last 4 bytes (modulo 4 GiB: never less than
    ``size``, which larger files are taken to hold at least)."""
    with open_binary(path) as file:
        file.seek(max(size - 4, 0))
        return max(int.from_bytes(file.read(4), "little"), size)


def check_parquet_column(path: str, text_field: str) -> None:
    """Fail before tokenizing, naming the file and its columns, when the text column is missing."""
    try:
        with open_binary(path) as file:
            columns = pq.read_schema(file).names
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"{path} is not a readable Parquet file ({error}); remove it or fix it.") from None
    if text_field not in columns:
        raise UserError(f"{path} has no column {text_field!r} (columns: {columns}); set data.text_field.")
