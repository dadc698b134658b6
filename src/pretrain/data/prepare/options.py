"""How a build is made: its options, sizes written like 16MB, and the token dtype."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.data.prepare.ranks import Ranks
from pretrain.data.prepare.tokenizer import tokenizer_file
from pretrain.errors import UserError

log = logging.getLogger(__name__)

CHUNK_BYTES = "16MB"


TOKENIZER_SAMPLE_BYTES = "64MB"


_BYTE_UNITS = {"tb": 1000**4, "gb": 1000**3, "mb": 1000**2, "kb": 1000, "b": 1}


def byte_count(value: int | str, option: str) -> int:
    """``16MB``, ``1.5GB``, ``65536`` (litdata's units: 1 MB = 1000**2 bytes) as a number of bytes."""
    text = str(value).strip().lower()
    for suffix, ratio in _BYTE_UNITS.items():
        number = text.removesuffix(suffix)
        if number != text or suffix == "b":
            try:
                count = int(float(number) * ratio)
            except ValueError:
                break
            if count > 0:
                return count
            break
    raise UserError(f"data.{option}={value!r} is not a positive size; write it like 16MB, 512KB or 1GB.")


def token_dtype(vocab_size: int) -> str:
    """The smallest unsigned integer type that holds every token id."""
    for dtype in ("uint8", "uint16", "uint32"):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return dtype
    raise ValueError(f"vocab_size={vocab_size} does not fit in uint32")


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tokenizer_request(
    tokenizer: str | None, vocab_size: int, sample_bytes: int | str, eos_token: str | None, bos_token: str | None
) -> dict:
    """The tokenizer part of a build request: a given file by its hash (and the end-of-text and beginning tokens
    named, if they are), a trained one by its size and sample."""
    named = {name: token for name, token in (("eos_token", eos_token), ("bos_token", bos_token)) if token}
    if tokenizer:
        return {"sha256": file_sha256(tokenizer_file(tokenizer)), **named}
    for name, token in named.items():
        raise UserError(
            f"data.{name} {token!r} names a token of a given tokenizer: set data.tokenizer too (a trained one has "
            "only its own <|endoftext|>, which ends each document and so stands before the next)."
        )
    return {"train_vocab_size": vocab_size, "sample_bytes": byte_count(sample_bytes, "tokenizer_sample_bytes")}


@dataclass(frozen=True)
class BuildOptions:
    """How a build is made, whatever is built and wherever (a single corpus or a mixture).

    Args:
        vocab_size: Size of the tokenizer trained when none is given.
        tokenizer: A ``tokenizer.json``, or a model folder holding one, to use instead of training one.
        val_fraction: Share of documents held out for validation.
        text_field: The JSONL field / Parquet column that holds each document's text.
        overwrite: Rebuild even if ``data_dir`` holds shards built from something else.
        progress: Show progress bars (bytes read).
        chunk_bytes: Size of each litdata chunk.
        tokenizer_sample_bytes: About how much training text the tokenizer is trained on.
        eos_token: The token of a given tokenizer that ends each document, where it has none of the usual names.
        bos_token: The token of a given tokenizer put before each document (none by default).
        ranks: The processes building together (default: this one alone).
    """

    vocab_size: int = 4096
    tokenizer: str | None = None
    val_fraction: float = 0.02
    text_field: str = "text"
    overwrite: bool = False
    progress: bool = False
    chunk_bytes: str = CHUNK_BYTES
    tokenizer_sample_bytes: int | str = TOKENIZER_SAMPLE_BYTES
    eos_token: str | None = None
    bos_token: str | None = None
    ranks: Ranks = field(default_factory=Ranks)

    def request(self) -> dict[str, Any]:
        """What the shards depend on besides the sources; a typo in a size fails here, before anything is read."""
        byte_count(self.chunk_bytes, "chunk_bytes")
        return {
            "tokenizer": tokenizer_request(
                self.tokenizer, self.vocab_size, self.tokenizer_sample_bytes, self.eos_token, self.bos_token
            ),
            "val_fraction": self.val_fraction,
            "text_field": self.text_field,
            "chunk_bytes": self.chunk_bytes,
        }
