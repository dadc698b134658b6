"""Corpora in every supported format: each document appears exactly once, byte for byte."""

from __future__ import annotations

import gzip
import json
import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pretrain.data.prepare.build import prepare
from pretrain.errors import UserError
from tests.helpers.corpora import WORDS, decoded_documents
from tests.helpers.runs import TINY_VOCAB


def sentence_docs(rng: random.Random, n: int) -> list[str]:
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) + rng.choice([".", "!\n", "\n\n"])
        for _ in range(n)
    ]


def write_mixed_corpus(root: Path, field: str = "text") -> list[str]:
    """Text, Markdown, JSONL, gzipped JSONL and Parquet files, with every kind of bad record."""
    rng = random.Random(7)
    expected = []
    (root / "books").mkdir(parents=True)
    for i, text in enumerate(sentence_docs(rng, 6)):
        (root / "books" / f"b{i}.{'md' if i % 2 else 'txt'}").write_text(text)
        expected.append(text)
    web = [*sentence_docs(rng, 30), "unicode: café — 日本語 🙂\n"]
    lines = [json.dumps({field: t, "url": f"u{i}"}, ensure_ascii=i % 2 == 0) for i, t in enumerate(web)]
    lines += ["", "{not json", json.dumps({"other": "no text field"}), json.dumps({field: ""})]
    (root / "web.jsonl").write_text("\n".join(lines) + "\n")
    expected += web
    latin1 = b'{"' + field.encode() + b'": "na\xefve caf\xe9"}\n'  # invalid UTF-8 inside a record
    gz = sentence_docs(rng, 12)
    with gzip.open(root / "more.jsonl.gz", "wb") as out:
        out.write("".join(json.dumps({field: t}) + "\n" for t in gz).encode() + latin1)
    expected += [*gz, "na\ufffdve caf\ufffd"]
    rows = sentence_docs(rng, 25)
    pq.write_table(pa.table({field: [*rows, None], "id": list(range(26))}), root / "rows.parquet")
    expected += rows
    (root / "notes.csv").write_text("a,b\n1,2\n")  # not a corpus format: skipped and counted
    return expected


def test_mixed_formats_round_trip_exactly(tmp_path: Path) -> None:
    expected = write_mixed_corpus(tmp_path / "corpus")
    data_dir = tmp_path / "data"
    manifest = prepare([str(tmp_path / "corpus")], str(data_dir), vocab_size=TINY_VOCAB, val_fraction=0.2)
    train, val = decoded_documents(data_dir, "train"), decoded_documents(data_dir, "val")
    assert Counter(train + val) == Counter(expected)  # every document once, byte for byte
    assert len(val) >= 5 and len(train) >= 50
    assert manifest["skipped_files"] == {"empty": 0, "binary": 0, "unsupported": 1}
    assert manifest["skipped_records"] == {"malformed": 3, "empty": 1}  # bad JSON, no field, null row; ""
    assert manifest["invalid_utf8_documents"] == 1


def test_split_of_a_jsonl_document_does_not_depend_on_the_other_files(tmp_path: Path) -> None:
    write_mixed_corpus(tmp_path / "corpus")
    prepare([str(tmp_path / "corpus")], str(tmp_path / "a"), vocab_size=TINY_VOCAB, val_fraction=0.2)
    prepare([str(tmp_path / "corpus" / "*.jsonl")], str(tmp_path / "b"), vocab_size=TINY_VOCAB, val_fraction=0.2)
    jsonl_texts = {
        json.loads(line)["text"]
        for line in (tmp_path / "corpus" / "web.jsonl").read_text().splitlines()
        if line.startswith('{"text')
    }
    val_a = set(decoded_documents(tmp_path / "a", "val")) & jsonl_texts
    assert val_a and val_a == set(decoded_documents(tmp_path / "b", "val")) & jsonl_texts


def test_text_field_is_configurable(tmp_path: Path) -> None:
    expected = write_mixed_corpus(tmp_path / "corpus", field="content")
    prepare(
        [str(tmp_path / "corpus")],
        str(tmp_path / "data"),
        vocab_size=TINY_VOCAB,
        val_fraction=0.2,
        text_field="content",
    )
    texts = decoded_documents(tmp_path / "data", "train") + decoded_documents(tmp_path / "data", "val")
    assert Counter(texts) == Counter(expected)


def test_parquet_without_the_text_column_is_named(tmp_path: Path) -> None:
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "x.parquet")
    with pytest.raises(
        UserError, match=r"x\.parquet has no column 'text' \(columns: \['body'\]\); set data\.text_field"
    ):
        prepare([str(tmp_path / "x.parquet")], str(tmp_path / "data"), vocab_size=TINY_VOCAB)


def test_messy_text_round_trips_with_one_end_of_text_per_document(tmp_path: Path) -> None:
    """Text as web dumps have it: special-token strings, lone surrogates from JSON escapes, NUL, CRLF, a very
    long line. ``decoded_documents`` also checks each document holds exactly one end-of-text id, at its end."""
    rng = random.Random(3)
    corpus = tmp_path / "corpus"
    (corpus / "files").mkdir(parents=True)
    files = {
        "special.txt": "before <|endoftext|> after, and <|endoftext|><|endoftext|> twice\n",
        "crlf.txt": "line one\r\nline two\r\n\r\n",
        "long.txt": " ".join(rng.choice(WORDS) for _ in range(20_000)),  # one line of about 100 KB
        **{f"plain{i}.txt": text for i, text in enumerate(sentence_docs(rng, 20))},
    }
    for name, text in files.items():
        (corpus / "files" / name).write_bytes(text.encode())
    jsonl = [
        '{"text": "half a pair \\ud800 here"}',
        '{"text": "a whole pair \\ud83d\\ude00 is fine"}',
        '{"text": "a\\u0000b: a NUL inside a record"}',
    ]  # (a file with NUL bytes is binary: skipped)
    (corpus / "web.jsonl").write_text("\n".join(jsonl) + "\n")
    manifest = prepare([str(corpus)], str(tmp_path / "data"), vocab_size=TINY_VOCAB, val_fraction=0.2)
    texts = decoded_documents(tmp_path / "data", "train") + decoded_documents(tmp_path / "data", "val")
    expected = [
        *files.values(),
        "half a pair \ufffd here",
        "a whole pair \U0001f600 is fine",
        "a\x00b: a NUL inside a record",
    ]
    assert Counter(texts) == Counter(expected)
    assert manifest["invalid_utf8_documents"] == 1  # the lone surrogate, repaired and counted
