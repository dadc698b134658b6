"""Raw text -> tokenizer + token shards, the one-time step before training.

Output, under ``data_dir``:
- ``tokenizer.json``: trained on the training split, or a copy of the given one;
- ``train/`` and ``val/``: litdata chunks of token ids. Each document is followed by exactly one
  end-of-text token; a document goes wholly to one split, decided by a hash of its name;
- ``manifest.json``: what was asked for and what was built. Written last, so a build that was
  interrupted has none and is redone on the next run instead of being served.

Run alone (e.g. on CPU nodes before training), with a progress bar and a closing summary:
``pretrain prepare --config configs/quickstart.yaml`` (see ``pretrain.prepare``)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from litdata.streaming.item_loader import TokensLoader
from litdata.streaming.writer import BinaryWriter
from tokenizers import Tokenizer
from tqdm import tqdm

from pretrain._compat import write_as_single_process
from pretrain.data.readers import read_documents
from pretrain.data.sources import SourceFile, resolve_sources
from pretrain.data.tokenizer import eos_id, load_tokenizer, train_tokenizer
from pretrain.errors import UserError

log = logging.getLogger(__name__)

MANIFEST_VERSION = 2  # 2: special-token strings inside documents are encoded as text
SPLITS = ("train", "val")
ENCODE_BATCH_CHARS = 4_000_000  # text per encode_batch call: enough to keep every core busy


def token_dtype(vocab_size: int) -> str:
    """The smallest unsigned integer type that holds every token id."""
    for dtype in ("uint8", "uint16", "uint32"):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return dtype
    raise ValueError(f"vocab_size={vocab_size} does not fit in uint32")


def _unit_hash(key: str) -> float:
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass(frozen=True)
class DocumentSplit:
    """Which split a document goes to, decided by a hash of its key alone: the same on every machine."""

    val_fraction: float
    forced_val: frozenset[str] = frozenset()  # tiny text corpora: keys held out so val is never empty

    def of(self, key: str) -> str:
        return "val" if key in self.forced_val or _unit_hash(key) < self.val_fraction else "train"


def plan_split(files: list[SourceFile], val_fraction: float) -> tuple[DocumentSplit, dict[str, list[SourceFile]]]:
    """The split rule, and the files each split reads (a JSONL or Parquet file feeds both)."""
    split = DocumentSplit(val_fraction)
    if all(f.format == "text" for f in files):  # one document per file: the split is known now
        if len(files) < 2:
            raise UserError("The sources hold a single document; train/val splitting needs at least two.")
        if not any(split.of(f.key) == "val" for f in files):
            split = DocumentSplit(val_fraction, frozenset({min((f.key for f in files), key=_unit_hash)}))
        if all(split.of(f.key) == "val" for f in files):
            raise UserError(f"data.val_fraction={val_fraction} leaves no document for training; lower it.")
    return split, {name: [f for f in files if f.format != "text" or split.of(f.key) == name] for name in SPLITS}


def training_texts(files: list[SourceFile], split: DocumentSplit, text_field: str) -> Iterator[str]:
    """The training split's documents, for fitting the tokenizer (validation text stays unseen)."""
    for file in files:
        for document in read_documents(file.path, file.key, text_field):
            if document.text and split.of(document.key) == "train":
                yield document.text


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tokenizer_request(tokenizer: str | None, vocab_size: int) -> dict:
    """The tokenizer part of a build request: a given file by its hash, a trained one by its size."""
    return {"sha256": file_sha256(tokenizer)} if tokenizer else {"train_vocab_size": vocab_size}


def build_request(
    sources: list[str], vocab_size: int, tokenizer: str | None, val_fraction: float, text_field: str
) -> dict:
    """What defines the shards: a data_dir built for a different request must not be reused."""
    return {
        "sources": list(sources),
        "tokenizer": tokenizer_request(tokenizer, vocab_size),
        "val_fraction": val_fraction,
        "text_field": text_field,
    }


def read_manifest(data_dir: str | Path) -> dict | None:
    path = Path(data_dir) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_json_atomic(path: Path, content: dict) -> None:
    """Write to a temporary file and rename, so readers never see half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(tmp, path)


def existing_build(root: Path, request: dict, overwrite: bool) -> dict | None:
    """The manifest of a complete build of ``request`` in ``root``; None where there is none to keep.

    Refuses to replace a build of something else unless ``overwrite``.
    """
    manifest = read_manifest(root)
    if manifest is not None and manifest["request"] == request:
        if manifest.get("version") == MANIFEST_VERSION:
            return manifest
        log.warning("%s was built by an older version of this project (manifest version %s): rebuilding it.",
                    root, manifest.get("version"))  # fmt: skip
        return None
    if manifest is not None and not overwrite:
        raise UserError(
            f"{root} holds shards built for {_describe(manifest['request'])}, but this run asks for "
            f"{_describe(request)}. Point data.data_dir elsewhere, delete {root}, "
            "or set data.overwrite: true."
        )
    return None


def _describe(request: dict) -> str:
    return json.dumps(request, sort_keys=True)


def _shard_counts(split_dir: Path) -> dict[str, int]:
    chunks = json.loads((split_dir / "index.json").read_text())["chunks"]
    return {"documents": sum(c["chunk_size"] for c in chunks), "tokens": sum(c["dim"] for c in chunks)}


def _write_shards(
    files: list[SourceFile], split: DocumentSplit, text_field: str, tokenizer: Tokenizer, root: Path, progress: bool
) -> Counter:
    """Tokenize every document into the litdata chunks of its split, in one pass over the sources.

    Documents are encoded in batches by the tokenizer's own ``encode_batch`` (every core, no worker
    processes to start) and appended in order, each followed by the end-of-text token. Returns the
    noted events: malformed or empty records, invalid UTF-8.
    """
    eos, dtype = eos_id(tokenizer), token_dtype(tokenizer.get_vocab_size())
    tokenizer.encode_special_tokens = True  # "<|endoftext|>" inside a document is text, not a document break
    writers = {name: BinaryWriter(str(root / name), chunk_bytes="64MB", item_loader=TokensLoader()) for name in SPLITS}
    for writer in writers.values():  # one process writes everything: its merge must not wait for other ranks' parts
        write_as_single_process(writer)
    written, events = dict.fromkeys(SPLITS, 0), Counter()
    pending: list[tuple[str, str]] = []  # (split, text) waiting to be encoded

    def flush() -> None:
        encodings = tokenizer.encode_batch([text for _, text in pending], add_special_tokens=False)
        for (name, _), encoding in zip(pending, encodings, strict=True):
            ids = np.empty(len(encoding.ids) + 1, dtype=dtype)
            ids[:-1], ids[-1] = encoding.ids, eos
            writers[name].add_item(written[name], ids)
            written[name] += 1
        pending.clear()

    total = sum(Path(f.path).stat().st_size for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="Tokenizing", disable=not progress) as bar:
        pending_chars = 0
        for file in files:
            for document in read_documents(file.path, file.key, text_field):
                if document.text is None:
                    events["malformed"] += 1
                elif not document.text:
                    events["empty"] += 1
                else:
                    events["invalid_utf8"] += document.replaced_invalid_utf8
                    pending.append((split.of(document.key), document.text))
                    pending_chars += len(document.text)
                    if pending_chars >= ENCODE_BATCH_CHARS:
                        flush()
                        pending_chars = 0
            bar.update(Path(file.path).stat().st_size)
        flush()
    if written["val"] == 0:
        raise UserError(f"No document fell into the validation split; raise data.val_fraction ({split.val_fraction}).")
    for writer in writers.values():
        writer.done()
        writer.merge()  # index.json, the split's table of contents
    return events


def prepare(
    sources: list[str],
    data_dir: str,
    vocab_size: int = 4096,
    tokenizer: str | None = None,
    val_fraction: float = 0.02,
    text_field: str = "text",
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Build tokenizer and shards in ``data_dir`` unless an identical build is already there.

    Args:
        sources: Files, directories, globs or ``stdlib``.
        data_dir: Where the shards, tokenizer and manifest go.
        vocab_size: Size of the tokenizer trained when none is given.
        tokenizer: Path of a ``tokenizer.json`` to use instead of training one.
        val_fraction: Share of documents held out for validation.
        text_field: The JSONL field / Parquet column that holds each document's text.
        overwrite: Rebuild even if ``data_dir`` holds shards built from something else.
        progress: Show a progress bar while tokenizing.

    Returns:
        The manifest.
    """
    root = Path(data_dir)
    request = build_request(sources, vocab_size, tokenizer, val_fraction, text_field)
    if manifest := existing_build(root, request, overwrite):
        return manifest
    started = time.perf_counter()
    corpus = resolve_sources(sources, text_field)
    split, split_files = plan_split(corpus.files, val_fraction)
    # Whatever is there is stale or half-built: without the manifest it is never served.
    (root / "manifest.json").unlink(missing_ok=True)
    for name in SPLITS:
        shutil.rmtree(root / name, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)

    tokenizer_path = root / "tokenizer.json"
    if tokenizer:
        if Path(tokenizer).resolve() != tokenizer_path.resolve():
            shutil.copyfile(tokenizer, tokenizer_path)
        tok = load_tokenizer(tokenizer_path)
    else:
        log.info("Training a %d-token BPE tokenizer on the training split", vocab_size)
        tok = train_tokenizer(training_texts(split_files["train"], split, text_field), vocab_size)
        tok.save(str(tokenizer_path))
    log.info("Tokenizing %d files into %s", len(corpus.files), root)
    events = _write_shards(corpus.files, split, text_field, tok, root, progress)
    counts = {name: _shard_counts(root / name) for name in SPLITS}
    manifest = {
        "version": MANIFEST_VERSION,
        "request": request,
        "tokenizer": {
            "path": "tokenizer.json",
            "sha256": file_sha256(tokenizer_path),
            "vocab_size": tok.get_vocab_size(),
            "eos_id": eos_id(tok),
            "dtype": token_dtype(tok.get_vocab_size()),
        },
        "splits": counts,
        "source_bytes": sum(Path(f.path).stat().st_size for f in corpus.files),
        "skipped_files": corpus.skipped,  # left out: empty, binary, or not a supported format
        "skipped_records": {"malformed": events["malformed"], "empty": events["empty"]},  # JSONL/Parquet
        "invalid_utf8_documents": events["invalid_utf8"],  # kept, undecodable bytes replaced by U+FFFD
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_json_atomic(root / "manifest.json", manifest)
    log.info("Prepared %s: %s", root, json.dumps(counts))
    return manifest
