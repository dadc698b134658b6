"""Shards in object storage (``s3://``, ``gs://``, ``azure://``, ``r2://``, ``hf://``), copied into a local cache
before training: the manifest, the tokenizer (and its companion files) and the built-in eval task first, then
every chunk, each checked against the manifest's digest as it arrives. Training draws its blocks from the whole
build at every step, so streaming chunk by chunk would fetch all of them at once anyway. The chunks go under the
build's identity (``<cache_dir>/<identity>/``): a build uploaded again under the same URL is never served from an
older copy. ``local:/path`` takes the same road from a local folder (litdata's own stand-in for a bucket)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from litdata.streaming.downloader import get_downloader

from pretrain.data.prepare.next_line import TASK_PATH
from pretrain.data.prepare.ownership import TOKENIZER_FILES
from pretrain.data.prepare.verify import sha256_of
from pretrain.errors import UserError

REMOTE_PREFIXES = ("s3://", "gs://", "azure://", "r2://", "hf://", "local:")
BUILD_FILES = ("tokenizer.json", "manifest.json")  # the manifest last: it certifies the rest


def is_remote(data_dir: str) -> bool:
    return data_dir.startswith(REMOTE_PREFIXES)


def default_cache_dir(url: str) -> str:
    """``data/remote-cache/<url with anything but letters, digits, '.', '-' turned into '_'>``."""
    return str(Path("data") / "remote-cache" / re.sub(r"[^A-Za-z0-9.-]+", "_", url).strip("_"))


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def fetch_build_files(url: str, cache_dir: Path) -> None:
    """Fresh copies of the build's manifest and tokenizer in ``cache_dir``, and of its built-in eval task where
    it has one (a build made before it has none)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    downloader = get_downloader(url, str(cache_dir), [])
    for name in BUILD_FILES:
        if (error := _download(downloader, url, cache_dir, name)) is not None:
            raise UserError(
                f"Could not read {join(url, name)}: {error}. A remote data_dir must hold a finished build: "
                "make it with `pretrain prepare --data.data_dir data/<name>`, then upload the whole "
                "folder (e.g. `aws s3 sync data/<name> s3://bucket/<name>`), and check the credentials."
            ) from error
        if not (cache_dir / name).is_file():
            raise UserError(f"{join(url, name)} could not be fetched into {cache_dir}.")
    _download(downloader, url, cache_dir, TASK_PATH.as_posix())


def _download(downloader: Any, url: str, cache_dir: Path, name: str) -> Exception | None:
    """A fresh copy of ``url/name`` at ``cache_dir/name`` (the downloader keeps whatever is there: never a stale
    copy); the storage backend's error where it failed, each backend raising its own kinds."""
    return _download_as(downloader, join(url, name), cache_dir / name)


def _download_as(downloader: Any, source: str, target: Path) -> Exception | None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        downloader.download_file(source, str(target))
    except Exception as error:
        target.unlink(missing_ok=True)
        return error
    return None


def fetch_splits(url: str, cache: Path, splits: list[str], digests: dict[str, str] | None) -> None:
    """Every chunk of ``splits`` (e.g. ``train``, ``code/val``) and their indexes in ``cache``; a chunk already
    there was checked when it arrived (it is renamed into place only then). ``digests``: the manifest's
    ``{path: sha256}``; a chunk that does not match is refused, naming it."""
    downloader = get_downloader(url, str(cache), [])
    for split in splits:
        if (error := _download(downloader, url, cache, f"{split}/index.json")) is not None:
            raise UserError(f"Could not read {join(url, split, 'index.json')}: {error}. Upload the whole build folder.")
        for chunk in json.loads((cache / split / "index.json").read_text())["chunks"]:
            name = f"{split}/{chunk['filename']}"
            if not (cache / name).is_file():
                _fetch_checked(downloader, url, cache, name, (digests or {}).get(name))


def fetch_tokenizer_files(url: str, cache_dir: Path, digests: dict[str, str]) -> None:
    """Fresh copies of the companion files of the build's tokenizer (its manifest's ``{name: sha256}``)."""
    downloader = get_downloader(url, str(cache_dir), [])
    for name, digest in digests.items():
        (cache_dir / TOKENIZER_FILES / name).unlink(missing_ok=True)
        _fetch_checked(downloader, url, cache_dir, f"{TOKENIZER_FILES}/{name}", digest)


def _fetch_checked(downloader: Any, url: str, cache: Path, name: str, expected: str | None) -> None:
    """``url/name`` at ``cache/name``, renamed into place only once it matches the manifest's digest."""
    partial = f"{name}.partial"
    if (error := _download_as(downloader, join(url, name), cache / partial)) is not None:
        raise UserError(f"Could not read {join(url, name)}: {error}. Check the upload and the credentials.")
    if expected and sha256_of(cache / partial) != expected:
        (cache / partial).unlink()
        raise UserError(
            f"{join(url, name)} does not match the digest its manifest records: the upload is damaged or "
            "incomplete. Upload the build again (e.g. `aws s3 sync`), then run again."
        )
    (cache / partial).rename(cache / name)
