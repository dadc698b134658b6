"""Read the documents inside one source file: a text file is one document, JSONL one per line,
Parquet one per row."""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from pretrain.errors import UserError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES


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
class RawDocument:
    """One document's text, or None when its record was unusable (malformed JSON, no text field).

    ``key`` names it within the corpus (file key, plus ``#<line or row>`` inside JSONL/Parquet).
    """

    key: str
    text: str | None
    replaced_invalid_utf8: bool = False


# Half of a UTF-16 pair on its own, as JSON escapes like "\\ud800" produce: not text, and refused by the tokenizer.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def decode_text(data: bytes) -> tuple[str, bool]:
    """(text, whether any invalid UTF-8 had to be replaced by U+FFFD)."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


def read_documents(path: str, key: str, text_field: str) -> Iterator[RawDocument]:
    """Every document in the file, in order."""
    kind = file_format(path)
    if kind == "text":
        yield RawDocument(key, *decode_text(Path(path).read_bytes()))
    elif kind == "jsonl":
        yield from _jsonl_documents(path, key, text_field)
    else:
        yield from _parquet_documents(path, key, text_field)


def _jsonl_documents(path: str, key: str, text_field: str) -> Iterator[RawDocument]:
    opener = gzip.open if path.lower().endswith(".gz") else open
    with opener(path, "rb") as lines:
        for number, line in enumerate(lines):
            if not line.strip():
                continue  # blank lines separate nothing
            text, replaced = decode_text(line)
            try:
                value = json.loads(text)[text_field]
            except (ValueError, KeyError, TypeError):
                value = None
            if isinstance(value, str) and LONE_SURROGATE.search(value):
                value, replaced = LONE_SURROGATE.sub("\ufffd", value), True
            yield RawDocument(f"{key}#{number}", value if isinstance(value, str) else None, replaced)


def _parquet_documents(path: str, key: str, text_field: str) -> Iterator[RawDocument]:
    row = 0
    for batch in pq.ParquetFile(path).iter_batches(columns=[text_field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            yield RawDocument(f"{key}#{row}", value if isinstance(value, str) else None)
            row += 1


def check_parquet_column(path: str, text_field: str) -> None:
    """Fail before tokenizing, naming the file and its columns, when the text column is missing."""
    columns = pq.read_schema(path).names
    if text_field not in columns:
        raise UserError(f"{path} has no column {text_field!r} (columns: {columns}); set data.text_field.")
