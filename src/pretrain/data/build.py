"""Raw text -> tokenizer + token shards, the one-time step before training.

Output, under ``data_dir``:
- ``tokenizer.json``: trained on a sample of the training split, or a copy of the given one;
- ``train/`` and ``val/``: litdata chunks of token ids. Each document is followed by exactly one
  end-of-text token and goes wholly to one split (``plan.DocumentSplit``); documents are written in a
  pseudo-random order over the whole corpus (``buckets``), exact duplicates once;
- ``evals/next_line.jsonl``: a multiple-choice task from the validation documents (``next_line``);
- ``files.json``: every source file's path, size and modification time, to notice a changed corpus;
- ``manifest.json``: what was asked for and what was built, with the sha256 of every chunk. Written last, so a
  build that was interrupted has none and is redone on the next run instead of being served.

The sources are only read (``source_overlap``); only what a build wrote is ever removed (``ownership``); and one
builder at a time works in a ``data_dir`` (``build_lock``), in a scratch folder of its own.

The work is shared by every process of a torchrun group (``Ranks``); alone, a process does it all:
1. rank 0 takes the build lock, lists the files and decides whether an existing build stands;
2. unless a tokenizer is given, every rank draws its units' part of a seeded sample of the training text
   (about ``tokenizer_sample_bytes`` in all) and rank 0 trains the tokenizer on it;
3. every rank encodes its units into its part of every bucket;
4. every rank writes whole buckets as chunks; rank 0 joins their indexes and writes the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import resource
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from litdata.streaming.item_loader import TokensLoader
from litdata.streaming.writer import BinaryWriter
from tokenizers import Tokenizer
from tqdm import tqdm

from pretrain._compat import write_as_single_process
from pretrain.data.buckets import Bucket, BucketFiles, held_out_rows
from pretrain.data.build_lock import one_builder
from pretrain.data.next_line import TASK_PATH, write_mixture_task, write_next_line_task
from pretrain.data.ownership import claim_outputs, is_build_manifest, mark, new_scratch, remove_leftover_scratch
from pretrain.data.plan import DocumentSplit, plan_units, share_out, unit_hash
from pretrain.data.ranks import Ranks
from pretrain.data.readers import RawDocument, Unit, read_unit
from pretrain.data.source_overlap import refuse_overlap
from pretrain.data.sources import Corpus, any_source_found, resolve_sources
from pretrain.data.tokenizer import eos_id, load_tokenizer, train_tokenizer
from pretrain.data.verify import sha256_of
from pretrain.errors import SourcesNotFound, UserError

log = logging.getLogger(__name__)

# 3: documents mixed over the corpus by hash, keyed by byte offset, duplicates dropped; 4: every chunk's sha256
MANIFEST_VERSION = 4
SPLITS = ("train", "val")
# Text per encode_batch call: enough documents to keep every core busy (about 35 MB of memory per 1M characters).
ENCODE_BATCH_CHARS = max(4_000_000, 1_000_000 * (os.cpu_count() or 1))
BUCKET_SOURCE_BYTES = 128 * 2**20  # source text per bucket: a bucket's tokens are held in memory while written
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


def tokenizer_request(tokenizer: str | None, vocab_size: int, sample_bytes: int | str) -> dict:
    """The tokenizer part of a build request: a given file by its hash, a trained one by its size and sample."""
    if tokenizer:
        return {"sha256": file_sha256(tokenizer)}
    return {"train_vocab_size": vocab_size, "sample_bytes": byte_count(sample_bytes, "tokenizer_sample_bytes")}


def listing_digest(listing: Any) -> dict:
    """Stands for the file listing in a build request (the listing itself goes to ``files.json``)."""
    return {"sha256": hashlib.sha256(json.dumps(listing).encode()).hexdigest()}


def read_manifest(data_dir: str | Path) -> dict | None:
    path = Path(data_dir) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_json_atomic(path: Path, content: Any) -> None:
    """Write to a temporary file and rename, so readers never see half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(tmp, path)


def without_files(request: dict) -> dict:
    """The request as typed: what stays the same when only the files under the sources changed."""
    return {
        key: without_files(value) if isinstance(value, dict) else value
        for key, value in request.items()
        if key != "files"
    }


def _listing_changes(old: Any, new: Any) -> str:
    """Added, removed and changed files between two listings (a mixture's are per dataset)."""

    def entries(listing: Any) -> dict[str, tuple]:
        if isinstance(listing, dict):
            return {f"{name}: {p}": e for name, part in listing.items() for p, e in entries(part).items()}
        return {path: (size, mtime) for path, size, mtime in listing}

    before, after = entries(old), entries(new)
    kinds = {
        "added": sorted(set(after) - set(before)),
        "removed": sorted(set(before) - set(after)),
        "changed": sorted(p for p in set(after) & set(before) if after[p] != before[p]),
    }
    parts = [f"{kind} {len(paths)} ({', '.join(paths[:3])}{', ...' if len(paths) > 3 else ''})"
             for kind, paths in kinds.items() if paths]  # fmt: skip
    return "; ".join(parts) or "the same files, listed in another order"


def existing_build(root: Path, request: dict, listing: Any, overwrite: bool) -> dict | None:
    """The manifest of a complete build of ``request`` in ``root``; None where there is none to keep.

    Refuses a build of something else, or of files that changed since, unless ``overwrite``.
    """
    manifest = read_manifest(root)
    if not is_build_manifest(manifest):
        return None  # none, or a file of the user's (refused before anything is removed)
    if manifest["request"] == request:
        if manifest.get("version") == MANIFEST_VERSION:
            return manifest
        log.warning("%s was built by an older version of this project (manifest version %s): rebuilding it.",
                    root, manifest.get("version"))  # fmt: skip
        return None
    if overwrite:
        return None
    if without_files(manifest["request"]) == without_files(request) and (root / "files.json").is_file():
        changes = _listing_changes(json.loads((root / "files.json").read_text()), listing)
        raise UserError(
            f"The source files of {root} changed since it was built: {changes}. Rebuild it with "
            "--data.overwrite true, or point data.data_dir elsewhere."
        )
    raise UserError(
        f"{root} holds shards built for {_describe(manifest['request'])}, but this run asks for "
        f"{_describe(request)}. Point data.data_dir elsewhere, delete {root}, or set data.overwrite: true."
    )


def build_of_absent_sources(root: Path, request: dict) -> dict | None:
    """A finished build of these sources, when they are not present here (a training node without the raw
    corpus): it is served as it is, since its freshness cannot be checked."""
    manifest = read_manifest(root)
    if not is_build_manifest(manifest) or manifest["version"] != MANIFEST_VERSION:
        return None
    if without_files(manifest["request"]) == request:
        log.info("The sources are not present here: serving the build in %s as it is.", root)
        return manifest
    return None


def _describe(request: dict) -> str:
    return json.dumps(request, sort_keys=True)


def _shard_counts(split_dir: Path) -> dict[str, int]:
    chunks = json.loads((split_dir / "index.json").read_text())["chunks"]
    return {"documents": sum(c["chunk_size"] for c in chunks), "tokens": sum(c["dim"] for c in chunks)}


def _progress(units: list[Unit], ranks: Ranks, desc: str, show: bool) -> tqdm:
    """Bytes read by this process of its ``units`` (rank 0 shows its own; the others share the work alike)."""
    label = desc if ranks.world_size == 1 else f"{desc} (rank 0 of {ranks.world_size})"
    return tqdm(total=sum(unit.size for unit in units), unit="B", unit_scale=True, desc=label,
                disable=not (show and ranks.first))  # fmt: skip


def _read_with_progress(
    unit: Unit, text_field: str, bar: tqdm, wanted: Callable[[str], bool] | None = None
) -> Iterator[RawDocument]:
    """The unit's documents, moving ``bar`` by the bytes read (inside a file, not file by file)."""
    read = 0
    for document in read_unit(unit, text_field, wanted):
        now = min(document.read, unit.size)  # the last line of a byte range may run past its end
        bar.update(max(now - read, 0))
        read = max(read, now)
        yield document
    bar.update(unit.size - read)


def sample_for_tokenizer(
    plans: list[tuple[list[Unit], DocumentSplit]], text_field: str, sample_bytes: int, scratch: Path, ranks: Ranks,
    progress: bool,
) -> Iterator[str]:  # fmt: skip
    """A seeded sample of the training documents of every plan, about ``sample_bytes`` of text in all.

    Every rank draws its units' part into ``scratch``; rank 0 then reads the parts back in unit order.
    """
    total = sum(unit.text_size for units, _ in plans for unit in units)
    rate = min(1.0, sample_bytes / max(total, 1))
    numbered = [(p, n) for p, (units, _) in enumerate(plans) for n in range(len(units))]
    mine = [numbered[i] for i in share_out([plans[p][0][n] for p, n in numbered], ranks.world_size)[ranks.rank]]

    def draw() -> None:
        scratch.mkdir(parents=True, exist_ok=True)
        with _progress([plans[p][0][n] for p, n in mine], ranks, "Sampling for the tokenizer", progress) as bar:
            for p, n in mine:
                units, split = plans[p]
                with open(scratch / f"sample-{p}-{n}.jsonl", "w") as out:
                    for document in _read_with_progress(units[n], text_field, bar, _sampled(rate)):
                        if document.text and split.of(document) == "train":
                            out.write(json.dumps(document.text) + "\n")

    ranks.everywhere(draw)

    def texts() -> Iterator[str]:
        for p, n in numbered:
            with open(scratch / f"sample-{p}-{n}.jsonl") as lines:
                yield from (json.loads(line) for line in lines)

    return texts()


def _sampled(rate: float) -> Callable[[str], bool]:
    """Whether a document's key is in the tokenizer's sample: a share ``rate`` of keys, the same on every run."""
    return lambda key: unit_hash(f"tokenizer-sample:{key}") < rate


def make_tokenizer(
    root: Path, tokenizer: str | None, vocab_size: int, sample: Iterator[str] | None, ranks: Ranks
) -> Tokenizer:
    """``root/tokenizer.json``: a copy of the given one, or trained by rank 0 on ``sample``; loaded on every rank."""
    path = root / "tokenizer.json"

    def write() -> None:
        if tokenizer:
            if Path(tokenizer).resolve() != path.resolve():
                shutil.copyfile(tokenizer, path)
        else:
            log.info("Training a %d-token BPE tokenizer on a sample of the training split", vocab_size)
            train_tokenizer(sample, vocab_size).save(str(path))

    ranks.on_first(write)
    return load_tokenizer(path)


def _encode_units(
    units: list[Unit], numbers: list[int], split: DocumentSplit, text_field: str, tokenizer: Tokenizer,
    buckets: BucketFiles, bar: tqdm,
) -> Counter:  # fmt: skip
    """Encode this process's units into its part of every bucket; returns the noted events.

    A batch is encoded on a thread of its own (the tokenizer's cores, without the GIL) while this one
    reads the next batch and files the one before into the buckets.
    """
    eos, dtype = eos_id(tokenizer), token_dtype(tokenizer.get_vocab_size())
    tokenizer.encode_special_tokens = True  # "<|endoftext|>" inside a document is text, not a document break
    events, pending, pending_chars = Counter(), [], 0

    def file_away(batch: list[tuple], encodings: Future) -> None:
        for (name, text, unit, ordinal), encoding in zip(batch, encodings.result(), strict=True):
            ids = np.empty(len(encoding.ids) + 1, dtype=dtype)
            ids[:-1], ids[-1] = encoding.ids, eos
            buckets.add(name, text, unit, ordinal, ids)
        buckets.flush()

    with ThreadPoolExecutor(max_workers=1) as encoder:
        in_flight: tuple[list[tuple], Future] | None = None

        def flush() -> None:
            nonlocal in_flight, pending
            batch, pending = pending, []
            # Ids alone, without the character offsets training never reads.
            encodings = encoder.submit(tokenizer.encode_batch_fast, [text for _, text, _, _ in batch],
                                       add_special_tokens=False)  # fmt: skip
            if in_flight is not None:
                file_away(*in_flight)
            in_flight = (batch, encodings)

        for number in numbers:
            for ordinal, document in enumerate(_read_with_progress(units[number], text_field, bar)):
                if document.text is None:
                    events["malformed"] += 1
                elif not document.text:
                    events["empty"] += 1
                else:
                    events["invalid_utf8"] += document.replaced_invalid_utf8
                    events["pieces"] += document.piece is not None
                    pending.append((split.of(document), document.text, number, ordinal))
                    pending_chars += len(document.text)
                    if pending_chars >= ENCODE_BATCH_CHARS:
                        flush()
                        pending_chars = 0
        flush()
        file_away(*in_flight)
    return events


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
    units: list[Unit], split: DocumentSplit, text_field: str, tokenizer: Tokenizer, root: Path, scratch: Path,
    chunk_bytes: str, ranks: Ranks, progress: bool,
) -> dict[str, Any]:  # fmt: skip
    """Encode, deal to buckets, write: ``root/train`` and ``root/val``. Returns the counts for the manifest."""
    dtype = token_dtype(tokenizer.get_vocab_size())
    buckets = max(1, math.ceil(sum(unit.text_size for unit in units) / BUCKET_SOURCE_BYTES))
    mine = share_out(units, ranks.world_size)[ranks.rank]
    folders = [scratch / f"rank-{rank}" for rank in range(ranks.world_size)]

    def encode() -> Counter:
        with _progress([units[n] for n in mine], ranks, "Tokenizing", progress) as bar:
            return _encode_units(units, mine, split, text_field, tokenizer,
                                 BucketFiles(folders[ranks.rank], buckets, dtype), bar)  # fmt: skip

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
    if "val" not in written:
        raise UserError(f"No document fell into the validation split; raise data.val_fraction ({split.val_fraction}).")
    if "train" not in written:
        raise UserError(f"data.val_fraction={split.val_fraction} leaves no document for training; lower it.")

    def finish() -> dict[str, Any]:
        digests = {f"{name}/{chunk}": digest for name in SPLITS
                   for chunk, digest in _join_bucket_indexes(root / name).items()}  # fmt: skip
        counts = {name: _shard_counts(root / name) for name in SPLITS}
        tokens = sum(c["tokens"] for c in counts.values())
        for name in SPLITS:
            counts[name]["share"] = round(counts[name]["tokens"] / tokens, 6)
        return {"splits": counts, "events": events, "duplicates": duplicates, "buckets": buckets, "chunks": digests}

    return ranks.on_first(finish)


def warn_on_val_share(root: Path, splits: dict, val_fraction: float) -> None:
    share = splits["val"]["share"]
    if not val_fraction / 2 <= share <= 2 * val_fraction:
        log.warning(
            "%s: validation holds %.2f%% of the tokens, far from data.val_fraction=%s (whole documents go to "
            "one split; a few large ones decide the share).", root, 100 * share, val_fraction,
        )  # fmt: skip


def ensure_next_line_task(root: Path, datasets: list[str] | None = None) -> None:
    """A build made before the next-line task existed (a mixture's ``datasets`` each) gets it when next served:
    it needs only the build."""
    if (root / TASK_PATH).is_file() or not (root / "tokenizer.json").is_file():
        return
    tokenizer = load_tokenizer(root / "tokenizer.json")
    for folder in [root / name for name in datasets] if datasets else [root]:
        if not (folder / TASK_PATH).is_file():
            write_next_line_task(folder, tokenizer)
            mark(folder / "evals")
    if datasets:
        write_mixture_task(root, [root / name for name in datasets])
        mark(root / "evals")


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


@dataclass(frozen=True)
class BuildOptions:
    """How a build is made, whatever is built and wherever (a single corpus or a mixture).

    Args:
        vocab_size: Size of the tokenizer trained when none is given.
        tokenizer: Path of a ``tokenizer.json`` to use instead of training one.
        val_fraction: Share of documents held out for validation.
        text_field: The JSONL field / Parquet column that holds each document's text.
        overwrite: Rebuild even if ``data_dir`` holds shards built from something else.
        progress: Show progress bars (bytes read).
        chunk_bytes: Size of each litdata chunk.
        tokenizer_sample_bytes: About how much training text the tokenizer is trained on.
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
    ranks: Ranks = field(default_factory=Ranks)

    def request(self) -> dict[str, Any]:
        """What the shards depend on besides the sources; a typo in a size fails here, before anything is read."""
        byte_count(self.chunk_bytes, "chunk_bytes")
        return {
            "tokenizer": tokenizer_request(self.tokenizer, self.vocab_size, self.tokenizer_sample_bytes),
            "val_fraction": self.val_fraction,
            "text_field": self.text_field,
            "chunk_bytes": self.chunk_bytes,
        }


def build_tokenizer(root: Path, plans: list[list[Unit]], options: BuildOptions, scratch: Path) -> Tokenizer:
    """The given tokenizer, or one trained on a sample of the training documents of every plan."""
    sample = None
    if not options.tokenizer:
        split = DocumentSplit(options.val_fraction)
        sample_bytes = byte_count(options.tokenizer_sample_bytes, "tokenizer_sample_bytes")
        sample = sample_for_tokenizer([(units, split) for units in plans], options.text_field, sample_bytes,
                                      scratch, options.ranks, options.progress)  # fmt: skip
    return make_tokenizer(root, options.tokenizer, options.vocab_size, sample, options.ranks)


def prepare(sources: list[str], data_dir: str, **options: Any) -> dict[str, Any]:
    """Build tokenizer and shards in ``data_dir`` from ``sources`` (files, directories, globs, URLs or
    ``stdlib``) unless an identical build is already there; ``options``: ``BuildOptions``' fields.

    Returns:
        The manifest.
    """
    built_with = BuildOptions(**options)
    ranks, root = built_with.ranks, Path(data_dir)
    request = {"sources": list(sources), **built_with.request()}
    ranks.on_first(lambda: refuse_overlap(sources, root))
    with one_builder(root, ranks):
        return _prepare_locked(sources, root, built_with, request)


def _prepare_locked(sources: list[str], root: Path, built_with: BuildOptions, request: dict) -> dict[str, Any]:
    """``prepare``, by the one builder of ``root``."""
    ranks, val_fraction, text_field = built_with.ranks, built_with.val_fraction, built_with.text_field

    def check() -> tuple[dict | None, Corpus | None, dict, Path | None]:
        remove_leftover_scratch(root)
        try:
            corpus = resolve_sources(sources, text_field)
        except SourcesNotFound:
            if not any_source_found(sources) and (served := build_of_absent_sources(root, request)):
                return served, None, request, None
            raise
        request["files"] = listing_digest(corpus.listing())
        if manifest := existing_build(root, request, corpus.listing(), built_with.overwrite):
            return manifest, None, request, None
        claim_outputs(root, tokenizer=built_with.tokenizer)
        return None, corpus, request, new_scratch(root)

    started = time.perf_counter()
    manifest, corpus, request, scratch = ranks.on_first(check)
    if manifest is not None:
        ranks.on_first(lambda: ensure_next_line_task(root))
        return manifest
    units, split = ranks.everywhere(lambda: plan_units(corpus.files, val_fraction)), DocumentSplit(val_fraction)
    tok = build_tokenizer(root, [units], built_with, scratch)
    log.info("Tokenizing %d files into %s", len(corpus.files), root)
    built = build_shards(units, split, text_field, tok, root, scratch, built_with.chunk_bytes, ranks,
                         built_with.progress)  # fmt: skip
    rss = ranks.gather(peak_rss_mb())

    def finish() -> dict[str, Any]:
        manifest = manifest_of(request, tok, root, built, corpus, len(units), ranks.world_size, rss,
                               time.perf_counter() - started)  # fmt: skip
        write_json_atomic(root / "files.json", corpus.listing())
        write_next_line_task(root, tok)
        shutil.rmtree(scratch, ignore_errors=True)
        write_json_atomic(root / "manifest.json", manifest)
        warn_on_val_share(root, manifest["splits"], val_fraction)
        log.info("Prepared %s: %s", root, json.dumps(manifest["splits"]))
        return manifest

    return ranks.on_first(finish)


def manifest_of(
    request: dict, tokenizer: Tokenizer, root: Path, built: dict, corpus: Corpus, units: int, processes: int,
    rss: list[float], seconds: float,
) -> dict[str, Any]:  # fmt: skip
    events = built["events"]
    return {
        "version": MANIFEST_VERSION,
        "request": request,
        "tokenizer": {
            "path": "tokenizer.json",
            "sha256": file_sha256(root / "tokenizer.json"),
            "vocab_size": tokenizer.get_vocab_size(),
            "eos_id": eos_id(tokenizer),
            "dtype": token_dtype(tokenizer.get_vocab_size()),
        },
        "splits": built["splits"],  # documents, tokens and share of the tokens per split
        "source_bytes": corpus.bytes,
        "skipped_files": corpus.skipped,  # left out: empty, binary, or not a supported format
        "skipped_records": {"malformed": events["malformed"], "empty": events["empty"]},  # JSONL/Parquet
        "invalid_utf8_documents": events["invalid_utf8"],  # kept, undecodable bytes replaced by U+FFFD
        "duplicate_documents": built["duplicates"],  # exact copies dropped (of a training or validation text)
        "pieces": events["pieces"],  # documents that are pieces of a text file cut at line breaks
        "layout": {"units": units, "buckets": built["buckets"], "processes": processes},
        "peak_rss_mb": rss,  # per process
        "seconds": round(seconds, 2),
        "chunks": built["chunks"],  # sha256 of every chunk, by its path under the build's folder
    }
