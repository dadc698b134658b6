"""Checks of a finished build that read every byte (``pretrain prepare --verify``, and shards fetched from a
bucket): each chunk against the digest its manifest recorded, each token id against the vocabulary; and the
check every run makes of the small files, that the tokenizer is still the one the shards were encoded with."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.data.prepare.ownership import TOKENIZER_FILES
from pretrain.data.prepare.tokenizer import load_tokenizer
from pretrain.data.shards import split_dtype
from pretrain.errors import UserError

_READ_BYTES = 2**20
REBUILD = "Rebuild the shards: remove the build's manifest.json and run `pretrain prepare` again."


def sha256_of(path: Path) -> str:
    """The file's sha256, read a block at a time (a chunk is never held in memory twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(_READ_BYTES):
            digest.update(block)
    return digest.hexdigest()


def verify_chunk_digests(build_root: Path, manifest: dict[str, Any]) -> None:
    """Every chunk the manifest lists (``"chunks"``: path under ``build_root`` -> sha256) is there and whole;
    the first that is not is named."""
    chunks = manifest.get("chunks")
    if not chunks:
        raise UserError(
            f"The manifest of {build_root} lists no chunk checksums (it was built before they were recorded): "
            "`pretrain prepare` rebuilds it."
        )
    _check_digests(
        build_root,
        chunks,
        missing=lambda path: f"Shard {path} is missing. {REBUILD}",
        changed=lambda path: (
            f"Shard {path} does not match its checksum in {build_root / 'manifest.json'}: it was "
            f"damaged or changed since it was built. {REBUILD}"
        ),
    )


def _check_digests(
    build_root: Path, digests: dict[str, str], missing: Callable[[Path], str], changed: Callable[[Path], str]
) -> None:
    """Every file of ``digests`` (path under ``build_root`` -> sha256) is there and as recorded; the first that
    is not raises the message ``missing`` or ``changed`` gives for it."""
    for name, expected in digests.items():
        path = build_root / name
        if not path.is_file():
            raise UserError(missing(path))
        if sha256_of(path) != expected:
            raise UserError(changed(path))


def verify_tokenizer_files(build_root: Path, manifest: dict[str, Any]) -> None:
    """The build's ``tokenizer.json`` and the companion files beside it are the ones its manifest recorded: an
    edited tokenizer would read the shards' ids as other text, and hand other ids to generation and export."""
    recorded = manifest["tokenizer"]
    files = {"tokenizer.json": recorded["sha256"]}
    files |= {f"{TOKENIZER_FILES}/{name}": digest for name, digest in recorded.get("files", {}).items()}
    _check_digests(
        build_root,
        files,
        missing=lambda path: f"{path}, a file of the build in {build_root}, is missing. {REBUILD}",
        changed=lambda path: (
            f"{path} changed since the build encoded its shards with it (its sha256 is not the "
            f"one in {build_root / 'manifest.json'}). Put the build's own file back, or rebuild: remove manifest.json, "
            "or set data.overwrite: true."
        ),
    )


def verify_token_ids(split_dir: Path, vocab_size: int) -> None:
    """Every token id of every chunk of the split is below ``vocab_size``; names the first shard holding one
    that is not (a build made with another tokenizer, or damaged), and that id."""
    if not (split_dir / "index.json").is_file():
        raise UserError(f"{split_dir / 'index.json'} is missing. {REBUILD}")
    dtype = split_dtype(split_dir)
    for chunk in json.loads((split_dir / "index.json").read_text())["chunks"]:
        path = split_dir / chunk["filename"]
        if not path.is_file():
            raise UserError(f"Shard {path} is missing. {REBUILD}")
        raw = np.fromfile(path, dtype=np.uint8)
        count = int(raw[:4].view(np.uint32)[0]) if raw.size >= 4 else -1
        start = 4 * (count + 2)
        if count < 0 or raw.size < start or (raw.size - start) % dtype.itemsize:
            raise UserError(f"Shard {path} is truncated or corrupted (its header does not fit). {REBUILD}")
        tokens = raw[start:].view(dtype)
        if tokens.size and (largest := int(tokens.max())) >= vocab_size:
            raise UserError(
                f"Shard {path} holds token id {largest}, outside the tokenizer's vocabulary of {vocab_size} ids: it "
                f"was built with another tokenizer, or damaged. {REBUILD}"
            )


def verify_build(root: Path) -> dict[str, Any]:
    """``pretrain prepare --verify``: the build in ``root`` (a single corpus or a mixture) checked whole, without
    building anything; returns its manifest."""
    path = root / "manifest.json"
    if not path.is_file():
        raise UserError(f"{root} holds no complete build (manifest.json is missing); `pretrain prepare` builds it.")
    manifest = json.loads(path.read_text())
    verify_tokenizer_files(root, manifest)
    verify_chunk_digests(root, manifest)
    vocab_size = load_tokenizer(root / "tokenizer.json").get_vocab_size()
    for name in manifest.get("mixture") or [""]:
        for split in ("train", "val"):
            verify_token_ids(root / name / split, vocab_size)
    return manifest
