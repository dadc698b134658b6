"""Turn the configured source strings into a list of documents, and read a document's text.

A source is one of:
- ``stdlib``: the ``.py`` files of the running interpreter's standard library, without test
  folders or site-packages. Real text present wherever Python is, so nothing is downloaded;
- a file (one file = one document);
- a directory: every ``.txt`` / ``.md`` file below it;
- a glob such as ``corpus/**/*.txt``.
"""

from __future__ import annotations

import glob
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.errors import UserError

TEXT_SUFFIXES = (".txt", ".md")
BINARY_SNIFF_BYTES = 8192
STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True)
class Document:
    """A document to tokenize. ``key`` names it relative to its source, the same on every machine
    and wherever the corpus is mounted: it decides the document's split."""

    path: str
    key: str


def read_text(path: str) -> str:
    """The file's text; bytes that are not UTF-8 become U+FFFD instead of failing the build."""
    return decode_text(Path(path).read_bytes())[0]


def decode_text(data: bytes) -> tuple[str, bool]:
    """(text, whether any invalid UTF-8 had to be replaced by U+FFFD)."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


def stdlib_documents() -> list[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = (
        path for path in root.rglob("*.py") if not STDLIB_EXCLUDED_DIRS.intersection(path.relative_to(root).parts[:-1])
    )
    return [Document(str(path), f"stdlib/{path.relative_to(root).as_posix()}") for path in sorted(files)]


def _directory_documents(source: str) -> list[Document]:
    root = Path(source)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    return [Document(str(p), p.relative_to(root).as_posix()) for p in files]


def _glob_root(pattern: str) -> Path:
    """The folder above the pattern's first wildcard: ``corpus/*/x.txt`` -> ``corpus``."""
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    return Path(*parts[:fixed]) if fixed else Path()


def _source_documents(source: str) -> list[Document]:
    if source == "stdlib":
        return stdlib_documents()
    if Path(source).is_dir():
        return _directory_documents(source)
    if Path(source).is_file():
        return [Document(source, Path(source).name)]
    if glob.has_magic(source):
        matches = sorted(Path(m) for m in glob.glob(source, recursive=True) if Path(m).is_file())
        if not matches:
            raise UserError(f"Source glob {source!r} matches no files; check the pattern and the working directory.")
        root = _glob_root(source)
        return [Document(str(m), m.relative_to(root).as_posix()) for m in matches]
    raise UserError(
        f"Source {source!r} does not exist. Give a file, a directory, a glob, or 'stdlib' "
        f"(paths are relative to {Path.cwd()})."
    )


def is_binary(path: str) -> bool:
    """Text files hold no NUL bytes; binary formats almost always do, early on."""
    with open(path, "rb") as file:
        return b"\0" in file.read(BINARY_SNIFF_BYTES)


@dataclass
class Corpus:
    """The documents to tokenize, and how many files were left out and why."""

    documents: list[Document]
    skipped: dict[str, int] = field(default_factory=lambda: {"empty": 0, "binary": 0})


def resolve_documents(sources: list[str]) -> Corpus:
    """Every document of every source, in a fixed order, each file once; empty and binary files left out."""
    if not sources:
        raise UserError("data.sources is empty; name at least one file, directory, glob or 'stdlib'.")
    corpus, seen = Corpus([]), set()
    for source in sources:
        found = _source_documents(source)
        if not found:
            raise UserError(f"Source {source!r} holds no {'/'.join(TEXT_SUFFIXES)} files.")
        for document in found:
            real = Path(document.path).resolve()
            if real in seen:
                continue
            seen.add(real)
            if real.stat().st_size == 0:
                corpus.skipped["empty"] += 1
            elif is_binary(document.path):
                corpus.skipped["binary"] += 1
            else:
                corpus.documents.append(document)
    if not corpus.documents:
        raise UserError(
            f"The sources {sources} hold no text (skipped: {corpus.skipped}); point data.sources at text files."
        )
    return corpus
