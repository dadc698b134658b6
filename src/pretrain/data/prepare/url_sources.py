"""Raw sources in object storage or on the Hugging Face hub (``s3://bucket/web/*.jsonl.gz``,
``hf://datasets/org/name/data/*.parquet``, ``gs://``, ...), listed and read through fsspec.

fsspec finds the filesystem by the URL's protocol; its backend is a package of its own
(``pip install s3fs``, ``gcsfs``, ``huggingface_hub``), with the usual credentials. Files are read in
byte ranges like local ones, so large remote files are shared out among processes too.
"""

from __future__ import annotations

import glob
from typing import IO, Any

import fsspec

from pretrain.errors import SourcesNotFound, UserError


def is_url(source: str) -> bool:
    return "://" in source


def _filesystem(url: str) -> tuple[Any, str]:
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as error:
        raise UserError(f"Cannot read {url}: {error}. Install the package fsspec names for its protocol.") from None


def _modified(info: dict) -> str:
    """A file's version as its filesystem reports it: a content id where there is one (ETag, checksum, the
    hub's blob id), else its modification time."""
    for key in (
        "ETag",
        "etag",
        "md5",
        "blob_id",
        "xet_hash",
        "sha256",
        "generation",
        "mtime",
        "LastModified",
        "last_modified",
        "updated",
        "created",
    ):
        if info.get(key) is not None:
            return str(info[key])
    return ""


def list_url(source: str) -> list[tuple[str, str, int, str]]:
    """``(url, key, size, modified)`` of every file the URL names: a file, everything below a folder, or a
    glob's matches; ``key`` is the path below the folder or the glob's fixed part."""
    fs, path = _filesystem(source)
    if glob.has_magic(path):
        root = path[: path.find(next(c for c in path if c in "*?["))].rsplit("/", 1)[0]
        found = fs.glob(path, detail=True)
    elif fs.isdir(path):
        root, found = path.rstrip("/"), fs.find(path, detail=True)
    elif fs.exists(path):
        root, found = path.rsplit("/", 1)[0], {path: fs.info(path)}
    else:
        raise SourcesNotFound(f"Source {source!r} does not exist (or the credentials do not allow listing it).")
    files = [(name, info) for name, info in sorted(found.items()) if info.get("type") != "directory"]
    return [
        (fs.unstrip_protocol(name), name[len(root) :].lstrip("/"), int(info.get("size") or 0), _modified(info))
        for name, info in files
    ]


def open_url(url: str) -> IO[bytes]:
    """A seekable binary file (fsspec reads it in ranges as it is read)."""
    fs, path = _filesystem(url)
    return fs.open(path, "rb")


def url_size(url: str) -> int:
    fs, path = _filesystem(url)
    return int(fs.size(path))
