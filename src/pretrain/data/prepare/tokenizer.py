"""Train a byte-level BPE tokenizer, or load a given ``tokenizer.json`` (Hugging Face tokenizers)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pretrain.errors import UserError

EOS_TOKEN = "<|endoftext|>"
# End-of-text tokens of common pretrained tokenizers, tried in order when one is given.
KNOWN_EOS_TOKENS = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>")


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE: any byte sequence encodes, and decoding gives the exact text back."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def tokenizer_file(path: str | Path) -> Path:
    """The ``tokenizer.json`` a path names: the file, or the one in a model's folder (``save_pretrained``'s)."""
    path = Path(path)
    return path / "tokenizer.json" if path.is_dir() else path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json`` (or a folder's), with a readable error when it is missing or not one."""
    path = tokenizer_file(path)
    if not path.is_file():
        raise UserError(
            f"Tokenizer file {path} does not exist; give a tokenizer.json or a model folder holding one, or leave "
            "data.tokenizer empty to train one on the sources."
        )
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:
        raise UserError(f"{path} is not a Hugging Face tokenizer.json ({error}).") from None


def eos_id(tokenizer: Tokenizer, name: str | None = None) -> int:
    """The id of the end-of-text token that separates documents in the shards: ``name``'s where one is given
    (``data.eos_token``), else the first of ``KNOWN_EOS_TOKENS`` the tokenizer has."""
    if name is not None:
        token_id = tokenizer.token_to_id(name)
        if token_id is None:
            raise UserError(f"data.eos_token {name!r} is not a token of the tokenizer; name one of its tokens.")
        return token_id
    for token in KNOWN_EOS_TOKENS:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise UserError(
        f"The tokenizer has none of the end-of-text tokens {list(KNOWN_EOS_TOKENS)}; name the one that ends its "
        "documents with data.eos_token."
    )


class DocumentBounds(NamedTuple):
    """The tokens around each document in the shards: ``bos`` before it (none unless ``data.bos_token`` names
    one), ``eos`` after it."""

    eos: int
    bos: int | None = None


def document_bounds(tokenizer: Tokenizer, eos_token: str | None = None, bos_token: str | None = None) -> DocumentBounds:
    """The end-of-text token (``eos_id``) and, where ``bos_token`` names one, the token put before each document:
    refused unless it is a token of the tokenizer other than the end-of-text token."""
    eos = eos_id(tokenizer, eos_token)
    if bos_token is None:
        return DocumentBounds(eos)
    bos = tokenizer.token_to_id(bos_token)
    if bos is None:
        raise UserError(f"data.bos_token {bos_token!r} is not a token of the tokenizer; name one of its tokens.")
    if bos == eos:
        raise UserError(
            f"data.bos_token {bos_token!r} is the end-of-text token, which already stands before every document "
            "but the first; leave data.bos_token empty."
        )
    return DocumentBounds(eos, bos)


BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def token_byte_lengths(tokenizer: Tokenizer) -> list[int]:
    """How many bytes of UTF-8 text each token id stands for (0 for special tokens): the denominator of bits
    per byte. Byte-level BPE writes one character per byte; SentencePiece-style vocabularies write a space
    as "▁" and bytes without a token of their own as ``<0xAB>``."""
    byte_level = '"ByteLevel"' in tokenizer.to_str()
    special = {token.content for token in tokenizer.get_added_tokens_decoder().values() if token.special}
    lengths = []
    for token_id in range(tokenizer.get_vocab_size()):
        token = tokenizer.id_to_token(token_id)
        if token is None or token in special:
            lengths.append(0)
        elif byte_level:
            lengths.append(len(token))
        elif BYTE_FALLBACK.fullmatch(token):
            lengths.append(1)
        else:
            lengths.append(len(token.replace("\u2581", " ").encode()))
    return lengths
