"""Token shards: a dataset's units encoded into buckets and written as litdata chunks, with their digests."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from litdata.streaming.item_loader import TokensLoader
from litdata.streaming.writer import BinaryWriter
from tokenizers import Tokenizer

from pretrain._compat import write_as_single_process
from pretrain.data.prepare.buckets import Bucket, BucketFiles, held_out_rows
from pretrain.data.prepare.encode import encode_units, progress_bar
from pretrain.data.prepare.manifest import SPLITS, write_json_atomic
from pretrain.data.prepare.options import token_dtype
from pretrain.data.prepare.plan import DocumentSplit, share_out
from pretrain.data.prepare.ranks import Ranks
from pretrain.data.prepare.readers import Unit
from pretrain.data.prepare.tokenizer import DocumentBounds
from pretrain.data.prepare.verify import sha256_of
from pretrain.errors import UserError

log = logging.getLogger(__name__)

BUCKET_SOURCE_BYTES = 128 * 2**20  # source text per bucket: a bucket's tokens are held in memory while written


def _shard_counts(split_dir: Path) -> dict[str, int]:
    chunks = json.loads((split_dir / "index.json").read_text())["chunks"]
    return {"documents": sum(c["chunk_size"] for c in chunks), "tokens": sum(c["dim"] for c in chunks)}


def _write_bucket(bucket: Bucket, rows: np.ndarray, split_dir: Path, number: int, chunk_bytes: str) -> None:
    """The bucket's documents, in the given row order, as chunks ``chunk-<bucket>-<n>.bin`` plus a part index that
    also holds each chunk's sha256 (read back at once, from the page cache)."""
    scratch = split_dir / f".bucket-{number}"
    writer = BinaryWriter(str(scratch), chunk_bytes=chunk_bytes, item_loader=TokensLoader())
    write_as_single_process(writer)  # its own folder and names: nothing shared with other processes' writers
    for item, row in enumerate(rows):
        writer.add_item(item, bucket.document(row))
    writer.done()
    index = json.loads(next(scratch.glob("*.index.json")).read_text())
    index["sha256"] = {}
    for n, chunk in enumerate(index["chunks"]):
        name = f"chunk-{number}-{n}.bin"
        os.replace(scratch / chunk["filename"], split_dir / name)
        chunk["filename"] = name
        index["sha256"][name] = sha256_of(split_dir / name)
    write_json_atomic(split_dir / f".bucket-{number}.json", index)
    shutil.rmtree(scratch)


def _join_bucket_indexes(split_dir: Path) -> dict[str, str]:
    """``index.json``: every bucket's chunks, in bucket order (litdata shuffles chunk order itself). Returns the
    chunks' digests by file name, in the same order."""
    parts = sorted(split_dir.glob(".bucket-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    indexes = [json.loads(part.read_text()) for part in parts]
    chunks = [chunk for index in indexes for chunk in index["chunks"]]
    write_json_atomic(split_dir / "index.json", {"chunks": chunks, "config": indexes[0]["config"]})
    for part in parts:
        part.unlink()
    return {name: digest for index in indexes for name, digest in index["sha256"].items()}


def build_shards(
    units: list[Unit],
    split: DocumentSplit,
    text_field: str,
    tokenizer: Tokenizer,
    bounds: DocumentBounds,
    root: Path,
    scratch: Path,
    chunk_bytes: str,
    ranks: Ranks,
    progress: bool,
) -> dict[str, Any]:
    """Encode, deal to buckets, write: ``root/train`` and ``root/val``. Returns the counts for the manifest."""
    dtype = token_dtype(tokenizer.get_vocab_size())
    buckets = max(1, math.ceil(sum(unit.text_size for unit in units) / BUCKET_SOURCE_BYTES))
    mine = share_out(units, ranks.world_size)[ranks.rank]
    folders = [scratch / f"rank-{rank}" for rank in range(ranks.world_size)]

    def encode() -> Counter:
        with progress_bar([units[n] for n in mine], ranks, "Tokenizing", progress) as bar:
            return encode_units(
                units, mine, split, text_field, tokenizer, bounds, BucketFiles(folders[ranks.rank], buckets, dtype), bar
            )

    events = sum(ranks.gather(ranks.everywhere(encode)), Counter())

    def write() -> int:
        dropped = 0
        jobs = [(name, number) for name in SPLITS for number in range(buckets)]
        for name, number in jobs[ranks.rank :: ranks.world_size]:
            (root / name).mkdir(parents=True, exist_ok=True)
            bucket = Bucket(folders, name, number, dtype)
            rows, repeats = bucket.order(held_out_rows(folders, number) if name == "train" else None)
            dropped += repeats
            if len(rows):
                _write_bucket(bucket, rows, root / name, number, chunk_bytes)
        return dropped

    duplicates = sum(ranks.gather(ranks.everywhere(write)))
    written = ranks.on_first(lambda: [name for name in SPLITS if any((root / name).glob(".bucket-*.json"))])
    if not written:
        raise UserError(
            f"The sources hold no text to train on: {events['malformed']} records without a string in the field "
            f"{text_field!r} and {events['empty']} empty documents. Set data.text_field to the field that holds "
            "the text, or give other data.sources."
        )
    if "val" not in written:
        raise UserError(f"No document fell into the validation split; raise data.val_fraction ({split.val_fraction}).")
    if "train" not in written:
        raise UserError(f"data.val_fraction={split.val_fraction} leaves no document for training; lower it.")

    def finish() -> dict[str, Any]:
        digests = {
            f"{name}/{chunk}": digest for name in SPLITS for chunk, digest in _join_bucket_indexes(root / name).items()
        }
        counts = {name: _shard_counts(root / name) for name in SPLITS}
        tokens = sum(c["tokens"] for c in counts.values())
        for name in SPLITS:
            counts[name]["share"] = round(counts[name]["tokens"] / tokens, 6)
        return {"splits": counts, "events": events, "duplicates": duplicates, "buckets": buckets, "chunks": digests}

    return ranks.on_first(finish)
