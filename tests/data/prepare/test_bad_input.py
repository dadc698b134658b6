"""Bad sources and damaged shards end in one clear message, and lose nothing already built."""

from __future__ import annotations

import gzip
import json
import subprocess
from pathlib import Path

import pytest

from pretrain.data import PretrainData
from pretrain.data.prepare.build import prepare
from pretrain.data.prepare.sources import resolve_sources
from pretrain.errors import UserError
from tests.helpers.corpora import decoded_documents, make_corpus
from tests.helpers.runs import TINY_VOCAB


def test_sources_without_text_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_bytes(b"\x00\x01\x02")
    with pytest.raises(UserError, match=r"hold no text \(skipped: \{'empty': 1, 'binary': 1, 'unsupported': 0\}\)"):
        resolve_sources([str(tmp_path)])


def test_records_without_the_text_field_are_named_as_the_problem(tmp_path: Path) -> None:
    lines = [json.dumps({"content": f"document {n}"}) for n in range(40)]
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"40 records without a string in the field 'text'.*Set data.text_field"):
        prepare([str(tmp_path / "corpus.jsonl")], str(tmp_path / "data"), vocab_size=TINY_VOCAB)
    manifest = prepare(
        [str(tmp_path / "corpus.jsonl")], str(tmp_path / "data"), vocab_size=TINY_VOCAB, text_field="content"
    )
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 40


@pytest.mark.parametrize("damage", ["cut short", "not gzip"])
def test_a_damaged_gzip_source_is_named_in_one_error(tmp_path: Path, damage: str) -> None:
    whole = gzip.compress(b"".join(json.dumps({"text": f"document {n} " * 20}).encode() + b"\n" for n in range(200)))
    content = whole[: len(whole) // 2] if damage == "cut short" else b'{"text": "plain text"}\n'
    (tmp_path / "corpus.jsonl.gz").write_bytes(content)
    path = tmp_path / "corpus.jsonl.gz"
    with pytest.raises(UserError, match=rf"{path} cannot be read to its end .*damaged or cut short"):
        prepare([str(path)], str(tmp_path / "data"), vocab_size=TINY_VOCAB)


def test_binary_files_are_skipped_and_counted(tmp_path: Path) -> None:
    docs = make_corpus(tmp_path / "corpus", n_docs=6)
    (tmp_path / "corpus" / "notes" / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    manifest = prepare([str(tmp_path / "corpus")], str(tmp_path / "data"), vocab_size=TINY_VOCAB)
    assert manifest["skipped_files"] == {"empty": 0, "binary": 1, "unsupported": 0}
    texts = decoded_documents(tmp_path / "data", "train") + decoded_documents(tmp_path / "data", "val")
    assert sum(map(len, texts)) == sum(map(len, docs.values()))  # every document's text (whole or in pieces), no more


def test_invalid_utf8_is_replaced_and_counted(tmp_path: Path) -> None:
    make_corpus(tmp_path / "corpus", n_docs=4)
    (tmp_path / "corpus" / "latin1.txt").write_bytes("café crème brûlée\n".encode("latin-1"))
    manifest = prepare([str(tmp_path / "corpus")], str(tmp_path / "data"), vocab_size=TINY_VOCAB)
    assert manifest["invalid_utf8_documents"] == 1
    texts = decoded_documents(tmp_path / "data", "train") + decoded_documents(tmp_path / "data", "val")
    assert "caf\ufffd cr\ufffdme br\ufffdl\ufffde\n" in texts


def test_truncated_shard_is_named(prepared: Path, tmp_path: Path) -> None:
    copy = tmp_path / "data"
    subprocess.run(["cp", "-r", str(prepared), str(copy)], check=True)
    chunk = next((copy / "train").glob("*.bin"))
    chunk.write_bytes(chunk.read_bytes()[:-100])
    data = PretrainData(data_dir=str(copy), vocab_size=TINY_VOCAB)
    with pytest.raises(UserError, match=rf"Shard {chunk} is truncated or corrupted"):
        data.setup("fit")


def test_corrupted_shard_header_is_named(prepared: Path, tmp_path: Path) -> None:
    copy = tmp_path / "data"
    subprocess.run(["cp", "-r", str(prepared), str(copy)], check=True)
    chunk = next((copy / "val").glob("*.bin"))
    raw = bytearray(chunk.read_bytes())
    raw[0:4] = (12345).to_bytes(4, "little")
    chunk.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=rf"Shard {chunk} is corrupted"):
        PretrainData(data_dir=str(copy), vocab_size=TINY_VOCAB).setup("fit")
