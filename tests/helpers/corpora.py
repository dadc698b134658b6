"""Small corpora tests write, and the documents a build holds read back."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from pretrain.data.prepare.manifest import read_manifest
from pretrain.data.shards import iter_documents
from tests.helpers.runs import TINY_VOCAB

WORDS = (
    "the cat dog bird sees eats likes a small big red blue tree house river under over near quickly slowly "
    "and then because while"
).split()


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


def write_docs(root: Path, words: list[str], n_docs: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True)
    for i in range(n_docs):
        (root / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words) for _ in range(rng.randint(80, 160))))
    return root


def decoded_documents(data_dir: Path, split: str) -> list[str]:
    tokenizer = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
    eos = read_manifest(data_dir)["tokenizer"]["eos_id"]
    texts = []
    for ids in iter_documents(data_dir / split):
        assert ids[-1] == eos and eos not in ids[:-1], "exactly one end-of-text, at the end"
        texts.append(tokenizer.decode(ids[:-1].tolist(), skip_special_tokens=False))
    return texts


def write_corpus(root: Path) -> None:
    """Every kind of unit: JSONL byte ranges, a gzipped file, Parquet row groups, whole and cut text files."""
    rng = random.Random(5)
    for name, letters in ALPHABETS.items():
        (root / name).mkdir(parents=True)
        texts = [source_text(rng, letters, rng.randint(10, 80)) for _ in range(400)]
        (root / name / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    with gzip.open(root / "web" / "b.jsonl.gz", "wt") as out:
        out.write("".join(json.dumps({"text": source_text(rng, "pqrst", 30)}) + "\n" for _ in range(100)))
    rows = [source_text(rng, "hjklm", 20) for _ in range(300)]
    pq.write_table(pa.table({"text": rows}), root / "code" / "c.parquet", row_group_size=50)
    (root / "books" / "long.txt").write_text(one_file_text(rng, 60_000))  # over a piece: cut at line breaks
    for i in range(5):
        (root / "books" / f"short{i}.md").write_text(one_file_text(rng, 20))


# Three sources, each written in its own letters, so any stretch of tokens tells which sources it holds.
ALPHABETS = {"books": "bcdfg", "code": "hjklm", "web": "pqrst"}


def source_text(rng: random.Random, letters: str, words: int) -> str:
    return " ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 6))) for _ in range(words)) + "\n"


def one_file_text(rng: random.Random, lines: int) -> str:
    return "".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) + ".\n" for _ in range(lines))


def small_build_options(corpus: Path, data_dir: Path) -> list[str]:
    """``pretrain prepare`` options that build ``corpus`` (``write_corpus``) in small chunks, quickly."""
    return [
        f"--data.sources=[{corpus}]",
        f"--data.data_dir={data_dir}",
        f"--data.vocab_size={TINY_VOCAB}",
        "--data.val_fraction=0.1",
        "--data.chunk_bytes=64KB",
        "--data.tokenizer_sample_bytes=300KB",
    ]
