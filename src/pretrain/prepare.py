"""Raw text -> tokenizer + token shards, the one-time step before training.

Output, under ``data_dir``:
- ``tokenizer.json``: trained on the training split, or a copy of the given one;
- ``train/`` and ``val/``: litdata chunks of token ids. Each document is followed by exactly one
  end-of-text token; a document goes wholly to one split, decided by a hash of its name;
- ``manifest.json``: what was asked for and what was built. Written last, so a build that was
  interrupted has none and is redone on the next run instead of being served.

Run alone (e.g. on a CPU node before training):
``python -m pretrain.prepare --sources "[stdlib]" --data_dir data/stdlib --vocab_size 4096``
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from litdata import optimize
from litdata.streaming.item_loader import TokensLoader
from tokenizers import Tokenizer

from pretrain.errors import UserError
from pretrain.sources import Document, decode_text, read_text, resolve_documents
from pretrain.tokenizer import eos_id, load_tokenizer, train_tokenizer

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> str:
    """The smallest unsigned integer type that holds every token id."""
    for dtype in ("uint8", "uint16", "uint32"):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return dtype
    raise ValueError(f"vocab_size={vocab_size} does not fit in uint32")


def is_validation(key: str, val_fraction: float) -> bool:
    """Stable split by document name: the same document lands in the same split on every machine."""
    return _unit_hash(key) < val_fraction


def _unit_hash(key: str) -> float:
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def split_documents(documents: list[Document], val_fraction: float) -> dict[str, list[Document]]:
    """Train/val split by document; each split gets at least one document."""
    if len(documents) < 2:
        raise UserError("The sources hold a single document; train/val splitting needs at least two.")
    val = [d for d in documents if is_validation(d.key, val_fraction)]
    if not val:  # tiny corpora: hold out the document that hashes lowest
        val = [min(documents, key=lambda d: _unit_hash(d.key))]
    if len(val) == len(documents):
        raise UserError(f"data.val_fraction={val_fraction} leaves no document for training; lower it.")
    val_keys = {d.key for d in val}
    return {"train": [d for d in documents if d.key not in val_keys], "val": val}


_TOKENIZERS: dict[str, Tokenizer] = {}


def tokenize_document(path: str, tokenizer_path: str, eos: int, dtype: str, report_dir: str) -> Iterator[np.ndarray]:
    """One document -> its token ids followed by end-of-text (runs in litdata's worker processes).

    Documents whose invalid UTF-8 was replaced are listed in ``report_dir``, one file per process.
    """
    if tokenizer_path not in _TOKENIZERS:  # loaded once per worker, not once per document
        _TOKENIZERS[tokenizer_path] = Tokenizer.from_file(tokenizer_path)
    text, replaced = decode_text(Path(path).read_bytes())
    if replaced:
        with open(Path(report_dir) / f"{os.getpid()}.txt", "a") as report:
            report.write(path + "\n")
    ids = _TOKENIZERS[tokenizer_path].encode(text, add_special_tokens=False).ids
    yield np.array([*ids, eos], dtype=dtype)


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_request(sources: list[str], vocab_size: int, tokenizer: str | None, val_fraction: float) -> dict:
    """What defines the shards: a data_dir built for a different request must not be reused."""
    return {
        "sources": list(sources),
        "tokenizer": {"sha256": file_sha256(tokenizer)} if tokenizer else {"train_vocab_size": vocab_size},
        "val_fraction": val_fraction,
    }


def read_manifest(data_dir: str | Path) -> dict | None:
    path = Path(data_dir) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_json_atomic(path: Path, content: dict) -> None:
    """Write to a temporary file and rename, so readers never see half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(tmp, path)


def _describe(request: dict) -> str:
    return json.dumps(request, sort_keys=True)


def _shard_counts(split_dir: Path) -> dict[str, int]:
    chunks = json.loads((split_dir / "index.json").read_text())["chunks"]
    return {"documents": sum(c["chunk_size"] for c in chunks), "tokens": sum(c["dim"] for c in chunks)}


def _write_shards(
    documents: list[Document], output_dir: Path, tokenizer_path: Path, eos: int, dtype: str, num_workers: int
) -> int:
    """Tokenize ``documents`` into litdata chunks; returns how many had invalid UTF-8 replaced."""
    report_dir = output_dir.with_name(f".{output_dir.name}-invalid-utf8")
    shutil.rmtree(report_dir, ignore_errors=True)
    report_dir.mkdir(parents=True)
    optimize(
        fn=partial(
            tokenize_document, tokenizer_path=str(tokenizer_path), eos=eos, dtype=dtype, report_dir=str(report_dir)
        ),
        inputs=[d.path for d in documents],
        output_dir=str(output_dir),
        chunk_bytes="64MB",
        item_loader=TokensLoader(),
        num_workers=max(1, min(num_workers, len(documents))),
        reorder_files=False,
        verbose=False,
    )
    replaced = sum(len(report.read_text().splitlines()) for report in report_dir.iterdir())
    shutil.rmtree(report_dir)
    return replaced


def prepare(
    sources: list[str],
    data_dir: str,
    vocab_size: int = 4096,
    tokenizer: str | None = None,
    val_fraction: float = 0.02,
    num_workers: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build tokenizer and shards in ``data_dir`` unless an identical build is already there.

    Args:
        sources: Files, directories, globs or ``stdlib``.
        data_dir: Where the shards, tokenizer and manifest go.
        vocab_size: Size of the tokenizer trained when none is given.
        tokenizer: Path of a ``tokenizer.json`` to use instead of training one.
        val_fraction: Share of documents held out for validation.
        num_workers: Tokenizing processes (default: all cores).
        overwrite: Rebuild even if ``data_dir`` holds shards built from something else.

    Returns:
        The manifest.
    """
    root = Path(data_dir)
    request = build_request(sources, vocab_size, tokenizer, val_fraction)
    manifest = read_manifest(root)
    if manifest is not None and manifest["request"] == request:
        return manifest
    if manifest is not None and not overwrite:
        raise UserError(
            f"{root} holds shards built for {_describe(manifest['request'])}, but this run asks for "
            f"{_describe(request)}. Point data.data_dir elsewhere, delete {root}, "
            "or set data.overwrite: true."
        )
    started = time.perf_counter()
    corpus = resolve_documents(sources)
    splits = split_documents(corpus.documents, val_fraction)
    # Whatever is there is stale or half-built: without the manifest it is never served.
    (root / "manifest.json").unlink(missing_ok=True)
    for split in SPLITS:
        shutil.rmtree(root / split, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)

    tokenizer_path = root / "tokenizer.json"
    if tokenizer:
        if Path(tokenizer).resolve() != tokenizer_path.resolve():
            shutil.copyfile(tokenizer, tokenizer_path)
        tok = load_tokenizer(tokenizer_path)
    else:
        log.info("Training a %d-token BPE tokenizer on %d documents", vocab_size, len(splits["train"]))
        tok = train_tokenizer((read_text(d.path) for d in splits["train"]), vocab_size)
        tok.save(str(tokenizer_path))
    eos, dtype = eos_id(tok), token_dtype(tok.get_vocab_size())

    counts, invalid_utf8 = {}, 0
    for split in SPLITS:
        log.info("Tokenizing %d %s documents into %s", len(splits[split]), split, root / split)
        workers = num_workers or os.cpu_count() or 1
        invalid_utf8 += _write_shards(splits[split], root / split, tokenizer_path, eos, dtype, workers)
        counts[split] = _shard_counts(root / split)
    manifest = {
        "version": MANIFEST_VERSION,
        "request": request,
        "tokenizer": {
            "path": "tokenizer.json",
            "sha256": file_sha256(tokenizer_path),
            "vocab_size": tok.get_vocab_size(),
            "eos_id": eos,
            "dtype": dtype,
        },
        "splits": counts,
        "skipped_files": corpus.skipped,  # left out: empty or binary
        "invalid_utf8_documents": invalid_utf8,  # kept, with undecodable bytes replaced by U+FFFD
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_json_atomic(root / "manifest.json", manifest)
    log.info("Prepared %s: %s", root, json.dumps(counts))
    return manifest


if __name__ == "__main__":
    from jsonargparse import auto_cli

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    auto_cli(prepare)
