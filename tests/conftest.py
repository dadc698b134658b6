"""Shared fixtures: a small synthetic corpus and its prepared shards, built once per session."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pretrain.prepare import prepare

WORDS = (
    "the cat dog bird sees eats likes a small big red blue tree house river under over near quickly slowly "
    "and then because while"
).split()
TINY_VOCAB = 320  # 256 byte tokens + end-of-text + a few merges


def make_corpus(root: Path, n_docs: int = 40, seed: int = 0) -> dict[str, str]:
    """Write ``n_docs`` small documents of grammar-like text; return {relative path: text}."""
    rng = random.Random(seed)
    docs = {}
    for i in range(n_docs):
        sentences = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
            for _ in range(rng.randint(3, 30))
        ]
        name = f"{'notes' if i % 3 else 'more'}/doc{i:03d}.{'md' if i % 4 == 0 else 'txt'}"
        docs[name] = "\n".join(sentences) + ("\n" if i % 2 else "")
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(docs[name], encoding="utf-8")
    return docs


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("corpus")
    return root, make_corpus(root)


@pytest.fixture(scope="session")
def prepared(corpus: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The corpus tokenized into shards with a tiny trained tokenizer (read-only for tests)."""
    data_dir = tmp_path_factory.mktemp("data")
    prepare([str(corpus[0])], str(data_dir), vocab_size=TINY_VOCAB, val_fraction=0.1)
    return data_dir
