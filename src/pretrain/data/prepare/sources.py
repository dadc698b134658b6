"""Turn the configured source strings into the list of files that make up the corpus.

A source is one of:
- ``stdlib``: the ``.py`` files of the running interpreter's standard library, without test
  folders or site-packages. Real text present wherever Python is, so nothing is downloaded;
- a file: ``.txt``/``.md`` (one document), ``.jsonl``/``.jsonl.gz`` (one per line), ``.parquet``
  (one per row); any other file named explicitly is read as one text document;
- a directory: every supported file below it (others are skipped and counted);
- a glob such as ``corpus/**/*.jsonl.gz``;
- any of these as a URL read through fsspec: ``s3://bucket/web/*.jsonl.gz``, ``hf://datasets/...``.
"""

from __future__ import annotations

import glob
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.data.prepare.readers import (
    SUPPORTED_SUFFIXES,
    check_parquet_column,
    file_format,
    has_supported_suffix,
    open_binary,
)
from pretrain.data.prepare.url_sources import is_url, list_url
from pretrain.errors import SourcesNotFound, UserError

BINARY_SNIFF_BYTES = 8192
STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True)
class SourceFile:
    """A file of the corpus. ``key`` names it relative to its source, the same on every machine
    and wherever the corpus is mounted: it decides which split its documents go to."""

    path: str
    key: str
    size: int = 0
    modified: int | str = 0  # modification time (ns) of a local file; what its filesystem reports of a remote one

    @property
    def format(self) -> str:
        return file_format(self.path)


def stdlib_files() -> list[SourceFile]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in STDLIB_EXCLUDED_DIRS]  # never entered
        files += [Path(folder) / name for name in names if name.endswith(".py")]
    return [SourceFile(str(path), f"stdlib/{path.relative_to(root).as_posix()}") for path in sorted(files)]


def _directory_files(source: str) -> tuple[list[SourceFile], int]:
    """Supported files below the directory, and how many other files were passed over."""
    root = Path(source)
    everything = sorted(p for p in root.rglob("*") if p.is_file())
    files = [SourceFile(str(p), p.relative_to(root).as_posix()) for p in everything if has_supported_suffix(p)]
    return files, len(everything) - len(files)


def glob_root(pattern: str) -> Path:
    """The folder above the pattern's first wildcard: ``corpus/*/x.txt`` -> ``corpus``."""
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    return Path(*parts[:fixed]) if fixed else Path()


def _url_files(source: str) -> tuple[list[SourceFile], int]:
    everything = [SourceFile(url, key, size, modified) for url, key, size, modified in list_url(source)]
    files = [file for file in everything if has_supported_suffix(Path(file.key)) or len(everything) == 1]
    return files, len(everything) - len(files)


def _source_files(source: str) -> tuple[list[SourceFile], int]:
    if source == "stdlib":
        return stdlib_files(), 0
    if is_url(source):
        return _url_files(source)
    if Path(source).is_dir():
        return _directory_files(source)
    if Path(source).is_file():
        return [SourceFile(source, Path(source).name)], 0
    if glob.has_magic(source):
        matches = sorted(Path(m) for m in glob.glob(source, recursive=True) if Path(m).is_file())
        if not matches:
            raise SourcesNotFound(
                f"Source glob {source!r} matches no files; check the pattern and the working directory."
            )
        root = glob_root(source)
        return [SourceFile(str(m), m.relative_to(root).as_posix()) for m in matches], 0
    raise SourcesNotFound(
        f"Source {source!r} does not exist. Give a file, a directory, a glob, or 'stdlib' "
        f"(paths are relative to {Path.cwd()})."
    )


def _with_stat(file: SourceFile) -> SourceFile:
    stat = Path(file.path).stat()
    return SourceFile(file.path, file.key, stat.st_size, stat.st_mtime_ns)


def any_source_found(sources: list[str]) -> bool:
    """Whether any of the sources names something present here (else a build of them is served as it is)."""
    for source in sources:
        try:
            _source_files(source)
        except SourcesNotFound:
            continue
        return True
    return False


def is_binary(path: str) -> bool:
    """Text files hold no NUL bytes; binary formats almost always do, early on."""
    with open_binary(path) as file:
        return b"\0" in file.read(BINARY_SNIFF_BYTES)


@dataclass
class Corpus:
    """The files to tokenize, and how many were left out and why."""

    files: list[SourceFile]
    skipped: dict[str, int] = field(default_factory=lambda: {"empty": 0, "binary": 0, "unsupported": 0})

    @property
    def bytes(self) -> int:
        return sum(file.size for file in self.files)

    def listing(self) -> list[list[str | int]]:
        """``[path, size, modification time]`` of every file: what a build is checked against for staleness."""
        return [[file.path, file.size, file.modified] for file in self.files]


def resolve_sources(sources: list[str], text_field: str = "text") -> Corpus:
    """Every file of every source, in a fixed order, each once; empty, binary and unsupported files left out."""
    if not sources:
        raise UserError("data.sources is empty; name at least one file, directory, glob or 'stdlib'.")
    corpus, seen = Corpus([]), set()
    for source in sources:
        found, unsupported = _source_files(source)
        corpus.skipped["unsupported"] += unsupported
        if not found:
            raise UserError(f"Source {source!r} holds no {'/'.join(SUPPORTED_SUFFIXES)} files.")
        for found_file in found:
            file = found_file if is_url(found_file.path) else _with_stat(found_file)
            identity = file.path if is_url(file.path) else str(Path(file.path).resolve())
            if identity in seen:
                continue
            seen.add(identity)
            if file.size == 0:
                corpus.skipped["empty"] += 1
            elif file.format == "text" and is_binary(file.path):
                corpus.skipped["binary"] += 1
            else:
                if file.format == "parquet":
                    check_parquet_column(file.path, text_field)
                corpus.files.append(file)
    if not corpus.files:
        raise UserError(
            f"The sources {sources} hold no text (skipped: {corpus.skipped}); point data.sources at text files."
        )
    return corpus
