"""The manifest: what a build was asked for and what it holds, whether an existing build stands, and the
figures a finished build reports."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from pretrain.data.prepare.options import file_sha256, token_dtype
from pretrain.data.prepare.ownership import is_build_manifest
from pretrain.data.prepare.sources import Corpus
from pretrain.data.prepare.tokenizer import DocumentBounds
from pretrain.data.prepare.tokenizer_files import companion_digests
from pretrain.errors import UserError

log = logging.getLogger(__name__)

# 3: documents mixed over the corpus by hash, keyed by byte offset, duplicates dropped; 4: every chunk's sha256
MANIFEST_VERSION = 4


SPLITS = ("train", "val")


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
    parts = [
        f"{kind} {len(paths)} ({', '.join(paths[:3])}{', ...' if len(paths) > 3 else ''})"
        for kind, paths in kinds.items()
        if paths
    ]
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
        log.warning(
            "%s was built by an older version of this project (manifest version %s): rebuilding it.",
            root,
            manifest.get("version"),
        )
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


def warn_on_val_share(root: Path, splits: dict, val_fraction: float) -> None:
    share = splits["val"]["share"]
    if not val_fraction / 2 <= share <= 2 * val_fraction:
        log.warning(
            "%s: validation holds %.2f%% of the tokens, far from data.val_fraction=%s (whole documents go to "
            "one split; a few large ones decide the share).",
            root,
            100 * share,
            val_fraction,
        )


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def manifest_of(
    request: dict,
    tokenizer: Tokenizer,
    bounds: DocumentBounds,
    root: Path,
    built: dict,
    corpus: Corpus,
    units: int,
    processes: int,
    rss: list[float],
    seconds: float,
) -> dict[str, Any]:
    events = built["events"]
    return {
        "version": MANIFEST_VERSION,
        "request": request,
        "tokenizer": {
            "path": "tokenizer.json",
            "sha256": file_sha256(root / "tokenizer.json"),
            "vocab_size": tokenizer.get_vocab_size(),
            "eos_id": bounds.eos,
            "bos_id": bounds.bos,  # before each document: none unless data.bos_token names one
            "dtype": token_dtype(tokenizer.get_vocab_size()),
            "files": companion_digests(root),  # a given tokenizer's companions, in tokenizer_files/
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
