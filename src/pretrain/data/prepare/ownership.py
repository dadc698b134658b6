"""What a build may remove: only what a build wrote. Every folder preparation makes holds a marker file, and a
folder that holds one owns its build files too (``tokenizer.json``, ``files.json``, ``manifest.json``) and, at the
build's top, the copies of a given tokenizer's companion files (``tokenizer_files``, marked too); anything
else under those names is the user's, and preparation refuses to touch it. The one exception is recorded: a
tokenizer the user put in ``data_dir/tokenizer.json`` and gave as ``data.tokenizer`` is kept, and stays the user's
in later builds. Other files in ``data_dir`` are never looked at.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pretrain.data.prepare.options import file_sha256
from pretrain.data.prepare.tokenizer import tokenizer_file
from pretrain.errors import UserError

MARKER = ".pretrain-build"
MARKER_TEXT = "Made by `pretrain prepare`: the build files in this folder are removed and rebuilt when it is redone.\n"
BUILD_FILES = ("tokenizer.json", "files.json", "manifest.json")
BUILD_FOLDERS = ("train", "val", "evals")
TOKENIZER_FILES = "tokenizer_files"  # at the build's top only: a given tokenizer's companion files
SCRATCH_PREFIX = ".build-"
USER_FILES = ".pretrain-user-files"  # build file names in a marked folder that are the user's, one per line


def mark(folder: Path) -> None:
    """Make ``folder`` (if needed) and mark it as made by a build."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / MARKER).is_file():
        (folder / MARKER).write_text(MARKER_TEXT)


def is_build_manifest(manifest: Any) -> bool:
    """Whether a ``manifest.json``'s content is a build's (a file of that name may be anything)."""
    return isinstance(manifest, dict) and {"version", "request", "splits"} <= manifest.keys()


def _folder_is_ours(path: Path) -> bool:
    """Marked, or empty (nothing to lose)."""
    return path.is_dir() and ((path / MARKER).is_file() or not any(path.iterdir()))


def user_files(folder: Path) -> set[str]:
    """The build file names in ``folder`` that hold the user's files although the folder is marked."""
    record = folder / USER_FILES
    return set(record.read_text().split()) if record.is_file() else set()


def _file_is_ours(path: Path) -> bool:
    return path.is_file() and (path.parent / MARKER).is_file() and path.name not in user_files(path.parent)


def _foreign(folder: Path, subfolders: Sequence[str], keep: Path | None) -> tuple[Path, str] | None:
    """The first build output in ``folder`` that a build did not write, if any, and how that is known."""
    for name in subfolders:
        path = folder / name
        if path.exists() and not _folder_is_ours(path):
            return path, f"a folder that preparation did not make (no {MARKER} marker)"
    for name in BUILD_FILES:
        path = folder / name
        if path.exists() and not _file_is_ours(path) and not (keep and path.resolve() == keep):
            if name in user_files(folder):
                return path, "the tokenizer an earlier build was given in place, so it is yours"
            return path, f"a file that preparation did not make (no {MARKER} marker)"
    return None


def _trained_by_a_build(root: Path) -> bool:
    """Whether ``root/tokenizer.json`` is the tokenizer the last finished build of ``root`` trained."""
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    if not is_build_manifest(manifest) or "train_vocab_size" not in manifest["request"].get("tokenizer", {}):
        return False
    return manifest.get("tokenizer", {}).get("sha256") == file_sha256(root / "tokenizer.json")


def _record_user_tokenizer(root: Path, keep: Path | None) -> None:
    """Record ``root/tokenizer.json`` as the user's where it is the given tokenizer and no build trained it;
    forget the record of a user's file that is gone."""
    names = {name for name in user_files(root) if (root / name).is_file()}
    tokenizer = root / "tokenizer.json"
    if keep and tokenizer.is_file() and tokenizer.resolve() == keep and not _trained_by_a_build(root):
        names.add(tokenizer.name)
    if names:
        (root / USER_FILES).write_text("".join(f"{name}\n" for name in sorted(names)))
    else:
        (root / USER_FILES).unlink(missing_ok=True)


def claim_outputs(root: Path, datasets: Sequence[str] = (), tokenizer: str | None = None) -> None:
    """Clear the previous build of ``root`` (a mixture's ``datasets`` each in its folder) and mark the folders
    of the next one. Refuses, before anything is removed, where a build output is not a build's own.

    ``tokenizer``: the given tokenizer (a file or a folder), which may be ``root/tokenizer.json`` itself (it is
    kept).
    """
    keep = tokenizer_file(tokenizer).resolve() if tokenizer else None
    folders = {
        root: [*BUILD_FOLDERS, TOKENIZER_FILES, *datasets],
        **{root / name: list(BUILD_FOLDERS) for name in datasets},
    }
    made = [root, root / "evals"] + [root / name / sub for name in datasets for sub in ("", *BUILD_FOLDERS)]
    if not datasets:
        made += [root / "train", root / "val"]
    for folder, subfolders in folders.items():
        if (found := _foreign(folder, subfolders, keep)) is not None:
            path, why = found
            raise UserError(
                f"{path} is {why}, and building {root} would remove or overwrite it. Point data.data_dir at "
                f"another folder, or move {path} away."
            )
    _record_user_tokenizer(root, keep)
    for folder in folders:
        (folder / "manifest.json").unlink(missing_ok=True)  # first: a build without it is never served
        for name in ("train", "val"):
            shutil.rmtree(folder / name, ignore_errors=True)
    shutil.rmtree(root / TOKENIZER_FILES, ignore_errors=True)  # the next build's tokenizer brings its own
    for folder in made:
        mark(folder)


def new_scratch(root: Path) -> Path:
    """A marked scratch folder for one build, named after its host and process (several builds never share one)."""
    host = re.sub(r"[^A-Za-z0-9.-]+", "_", socket.gethostname())
    scratch = root / f"{SCRATCH_PREFIX}{host}-{os.getpid()}-{secrets.token_hex(4)}"
    mark(scratch)
    return scratch


def remove_leftover_scratch(root: Path) -> None:
    """The scratch folders of builds that ended without cleaning up (killed, failed). Called under the build
    lock, so no live build of ``root`` owns one; folders without the marker are not ours and stay, unless empty
    (a build stopped between making its folder and marking it)."""
    for scratch in root.glob(f"{SCRATCH_PREFIX}*"):
        if scratch.is_dir() and ((scratch / MARKER).is_file() or not any(scratch.iterdir())):
            shutil.rmtree(scratch, ignore_errors=True)
