"""The tokenizer files of an exported folder. A tokenizer that came with its companion files (a public model's
folder) is given back as it came: ``tokenizer.json`` and every companion byte for byte, changed only where the
Hugging Face tokenizer would otherwise encode text to other ids than training did (a post-processor that adds a
BOS training did not add). A tokenizer trained here, or a bare ``tokenizer.json``, gets a ``tokenizer_config.json``
of our own. Each change to a file the tokenizer came with is returned as a line for the user."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, processors

from pretrain.data.prepare.tokenizer import DocumentBounds

PROBE = "The cat sat on the mat. 12 + 7 = 19"  # any text: post-processors add their tokens around whatever it is


def encodes_as_training(tokenizer: Tokenizer, bos: int | None) -> bool:
    """Whether encoding with the tokenizer's own special tokens gives what training stored for a document's text:
    its ids, after ``bos`` where one was added."""
    plain = tokenizer.encode(PROBE, add_special_tokens=False).ids
    return tokenizer.encode(PROBE).ids == ([bos] if bos is not None else []) + plain


def training_post_processor(tokenizer: Tokenizer, bos: int | None) -> processors.PostProcessor | None:
    """A post-processor that adds what training added before each document: ``bos``, or nothing."""
    if bos is None:
        return None
    token = tokenizer.id_to_token(bos)
    return processors.TemplateProcessing(
        single=[token, "$A"], pair=[token, "$A", token, "$B:1"], special_tokens=[(token, bos)]
    )


def write_tokenizer_files(
    folder: Path, tokenizer_json: str, companions: dict[str, bytes], bounds: DocumentBounds, max_length: int
) -> list[str]:
    """Write the tokenizer files into ``folder``; returns a line for each change to a file it came with."""
    tokenizer, changes, (eos, bos) = Tokenizer.from_str(tokenizer_json), [], bounds
    if encodes_as_training(tokenizer, bos):
        (folder / "tokenizer.json").write_text(tokenizer_json)
    else:
        tokenizer.post_processor = training_post_processor(tokenizer, bos)
        tokenizer.save(str(folder / "tokenizer.json"))
        added = f"adds {tokenizer.id_to_token(bos)} before the text, as training did" if bos is not None else ""
        changes.append(f"tokenizer.json: its post-processor {added or 'is left out: training added no BOS'}")
    for name, content in companions.items():
        (folder / name).write_bytes(content)
    if "tokenizer_config.json" not in companions:
        write_own_tokenizer_config(folder, tokenizer, eos, bos, max_length)
        return changes
    config = json.loads(companions["tokenizer_config.json"])
    settings = {"add_bos_token": bos is not None, "add_eos_token": False}
    # Some tokenizer classes rebuild the post-processor from these when loading (Llama's adds a BOS by default):
    # stated wherever they would differ from training, and wherever tokenizer.json was changed.
    if changes or any(name in config and config[name] != value for name, value in settings.items()):
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, **settings}, indent=2) + "\n")
        changes.append(f"tokenizer_config.json: {', '.join(f'{k}={v}' for k, v in settings.items())}")
    return changes


def write_own_tokenizer_config(folder: Path, tokenizer: Tokenizer, eos: int, bos: int | None, max_length: int) -> None:
    """The ``tokenizer_config.json`` and ``special_tokens_map.json`` of a tokenizer that came without them: its
    beginning of a document is ``bos`` where training added one, else the end-of-text token before it."""
    eos_token, bos_token = tokenizer.id_to_token(eos), tokenizer.id_to_token(eos if bos is None else bos)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos_token,
        "eos_token": eos_token,
        "model_max_length": max_length,
        "add_bos_token": bos is not None,
        "add_eos_token": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": bos_token, "eos_token": eos_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special) + "\n")
