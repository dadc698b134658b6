"""The files that come with a given ``tokenizer.json`` in a model's folder: its ``tokenizer_config.json`` (special
tokens, chat template), a separate chat template, the slow tokenizer's vocabulary. They do not change a single
id, but a continued model handed on without them loses its chat template and special tokens: the build copies
them, every checkpoint carries them, and ``pretrain export`` gives them back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer

from pretrain.data.prepare.options import file_sha256
from pretrain.data.prepare.ownership import TOKENIZER_FILES, mark
from pretrain.data.prepare.tokenizer import DocumentBounds, tokenizer_file

# What ``transformers`` saves beside ``tokenizer.json`` (and reads back with it); nothing else is looked at.
COMPANIONS = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


def copy_companions(tokenizer: str | Path, root: Path) -> None:
    """Copy the companions found beside the given tokenizer into the build's ``tokenizer_files`` folder."""
    folder = tokenizer_file(tokenizer).parent
    found = [folder / name for name in COMPANIONS if (folder / name).is_file()]
    if found:
        mark(root / TOKENIZER_FILES)
        for path in found:
            shutil.copyfile(path, root / TOKENIZER_FILES / path.name)


def companion_digests(root: Path) -> dict[str, str]:
    """The build's companions by name, each with its sha256 (for the manifest); none for a trained tokenizer."""
    folder = root / TOKENIZER_FILES
    return {name: file_sha256(folder / name) for name in COMPANIONS if (folder / name).is_file()}


def read_companions(build_dir: Path, names: list[str]) -> dict[str, bytes]:
    """The companions a build's manifest lists, as bytes (``tokenizer.model`` is binary)."""
    return {name: (build_dir / TOKENIZER_FILES / name).read_bytes() for name in names}


def beginning_id(tokenizer: Tokenizer, companions: dict[str, bytes], bounds: DocumentBounds) -> int:
    """The beginning-of-text id a Hugging Face reader of the exported folder sees (``config.json``'s
    ``bos_token_id``, lm-evaluation-harness's token for an empty context): the BOS training put before each
    document; else the one the tokenizer's own ``tokenizer_config.json`` names (a public model's, so that model
    and tokenizer agree); else the end-of-text token, which stands before every document but the first."""
    if bounds.bos is not None:
        return bounds.bos
    config = json.loads(companions.get("tokenizer_config.json", b"{}"))
    named = config.get("bos_token")
    named = named.get("content") if isinstance(named, dict) else named  # an AddedToken, as some versions write it
    found = tokenizer.token_to_id(named) if isinstance(named, str) else None
    return found if found is not None else bounds.eos
