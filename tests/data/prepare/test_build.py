"""Building shards from corpora as teams have them: several sources mixed into every chunk, large files
shared out in units, a one-file corpus, changed files noticed, duplicates dropped, a bounded tokenizer
sample."""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
from collections import Counter
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from pretrain.data import PretrainData
from pretrain.data.prepare import plan as plan_module
from pretrain.data.prepare.build import prepare
from pretrain.data.prepare.encode import read_with_progress
from pretrain.data.prepare.plan import DocumentSplit, plan_units
from pretrain.data.prepare.ranks import Ranks
from pretrain.data.prepare.sources import resolve_sources
from pretrain.data.prepare.tokenizer_sample import sample_for_tokenizer
from pretrain.data.shards import iter_chunks
from pretrain.errors import UserError
from tests.helpers.corpora import ALPHABETS, decoded_documents, make_corpus, one_file_text, source_text
from tests.helpers.runs import TINY_VOCAB


def write_sources(root: Path, documents: dict[str, int], seed: int = 0) -> dict[str, int]:
    """``documents[name]`` JSONL documents per source, in its own folder; returns the letters each holds."""
    rng, letters = random.Random(seed), Counter()
    for name, count in documents.items():
        (root / name).mkdir(parents=True)
        texts = [source_text(rng, ALPHABETS[name], rng.randint(20, 60)) for _ in range(count)]
        (root / name / "part.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        letters[name] = sum(len(t) for t in texts)
    return letters


def source_shares(text: str) -> dict[str, float]:
    counts = {name: sum(text.count(c) for c in alphabet) for name, alphabet in ALPHABETS.items()}
    total = sum(counts.values())
    return {name: count / total for name, count in counts.items()}


def test_every_chunk_and_the_first_batches_hold_every_source_in_proportion(tmp_path: Path) -> None:
    letters = write_sources(tmp_path / "corpus", {"books": 1500, "code": 1000, "web": 500})
    expected = {name: count / sum(letters.values()) for name, count in letters.items()}
    data_dir = tmp_path / "data"
    sources = [str(tmp_path / "corpus" / name) for name in ALPHABETS]  # in file order: books, then code, then web
    prepare(sources, str(data_dir), vocab_size=TINY_VOCAB, val_fraction=0.05, chunk_bytes="32KB")
    tokenizer = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
    chunks = list(iter_chunks(data_dir / "train"))
    assert len(chunks) >= 10
    for documents in chunks:
        shares = source_shares(tokenizer.decode([int(t) for ids in documents for t in ids]))
        assert all(abs(shares[name] - expected[name]) < 0.15 for name in ALPHABETS), shares

    data = PretrainData(data_dir=str(data_dir), seq_len=255, batch_size=8, num_workers=0, vocab_size=TINY_VOCAB)
    data.setup("fit")
    loader = iter(data.train_dataloader())
    early = [next(loader) for _ in range(8)]  # 16K tokens: the first of litdata's shuffled chunks
    shares = source_shares(tokenizer.decode([int(t) for batch in early for t in batch.flatten()]))
    assert all(abs(shares[name] - expected[name]) < 0.1 for name in ALPHABETS), shares


def test_large_files_read_in_units_give_the_same_documents_and_splits(tmp_path: Path, monkeypatch) -> None:
    write_sources(tmp_path / "corpus", {"books": 120, "code": 80, "web": 60})
    whole = tmp_path / "whole"
    prepare([str(tmp_path / "corpus")], str(whole), vocab_size=TINY_VOCAB, val_fraction=0.1)
    monkeypatch.setattr(plan_module, "UNIT_BYTES", 3000)  # every file read in many byte ranges
    units = plan_units(resolve_sources([str(tmp_path / "corpus")]).files, 0.1)
    assert len(units) >= 20
    in_units = tmp_path / "units"
    prepare([str(tmp_path / "corpus")], str(in_units), tokenizer=str(whole / "tokenizer.json"), val_fraction=0.1)
    for split in ("train", "val"):
        assert sorted(decoded_documents(in_units, split)) == sorted(decoded_documents(whole, split))


def test_progress_moves_inside_one_large_file(tmp_path: Path, monkeypatch) -> None:
    write_sources(tmp_path / "corpus", {"web": 200})
    monkeypatch.setattr(plan_module, "UNIT_BYTES", 10_000)
    unit, *_ = plan_units(resolve_sources([str(tmp_path / "corpus")]).files, 0.1)

    class Bar:
        def __init__(self) -> None:
            self.updates: list[int] = []

        def update(self, n: int) -> None:
            self.updates.append(n)

    bar = Bar()
    documents = list(read_with_progress(unit, "text", bar))
    assert len([n for n in bar.updates if n > 0]) == len(documents) > 10  # a step per document, not per file
    assert sum(bar.updates) == unit.size


def test_a_one_file_corpus_is_cut_at_line_breaks_and_holds_out_its_share(tmp_path: Path) -> None:
    text = one_file_text(random.Random(1), 4000)
    (tmp_path / "input.txt").write_text(text)
    manifest = prepare([str(tmp_path / "input.txt")], str(tmp_path / "data"), vocab_size=TINY_VOCAB, val_fraction=0.1)
    pieces = decoded_documents(tmp_path / "data", "train") + decoded_documents(tmp_path / "data", "val")
    assert manifest["pieces"] == len(pieces) >= 10
    assert all(piece.endswith("\n") for piece in pieces)  # cut at line breaks only
    assert "".join(sorted(pieces, key=text.index)) == text  # nothing lost, nothing repeated
    assert 0.07 <= manifest["splits"]["val"]["share"] <= 0.13


@pytest.mark.parametrize("names", [("big.txt", "small.txt"), ("a.txt", "b.txt"), ("input.txt", "notes.md")])
def test_a_big_and_a_small_file_split_by_size_not_by_name(tmp_path: Path, names: tuple[str, str]) -> None:
    rng = random.Random(2)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / names[0]).write_text(one_file_text(rng, 3000))
    (tmp_path / "corpus" / names[1]).write_text(one_file_text(rng, 300))
    manifest = prepare([str(tmp_path / "corpus")], str(tmp_path / "data"), vocab_size=TINY_VOCAB, val_fraction=0.1)
    assert 0.05 <= manifest["splits"]["val"]["share"] <= 0.2


def test_a_share_far_from_val_fraction_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rng = random.Random(3)
    texts = [one_file_text(rng, 500), *(one_file_text(rng, 10) for _ in range(19))]  # one document holds most text
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    with caplog.at_level(logging.WARNING):
        manifest = prepare([str(tmp_path / "c.jsonl")], str(tmp_path / "data"), vocab_size=TINY_VOCAB, val_fraction=0.1)
    share = manifest["splits"]["val"]["share"]
    assert not 0.05 <= share <= 0.2
    assert f"validation holds {100 * share:.2f}% of the tokens, far from data.val_fraction=0.1" in caplog.text


def test_added_changed_and_removed_files_are_noticed(tmp_path: Path) -> None:
    make_corpus(tmp_path / "corpus", n_docs=30)
    args = ([str(tmp_path / "corpus")], str(tmp_path / "data"))
    prepare(*args, vocab_size=TINY_VOCAB, val_fraction=0.2)
    (tmp_path / "corpus" / "notes" / "new.txt").write_text("A new document.\n")
    with pytest.raises(UserError, match=r"changed since it was built: added 1 \(.*new\.txt\).*overwrite true"):
        prepare(*args, vocab_size=TINY_VOCAB, val_fraction=0.2)
    manifest = prepare(*args, vocab_size=TINY_VOCAB, val_fraction=0.2, overwrite=True)
    assert "A new document.\n" in decoded_documents(tmp_path / "data", "train") + decoded_documents(
        tmp_path / "data", "val"
    )
    assert manifest == prepare(*args, vocab_size=TINY_VOCAB, val_fraction=0.2)  # unchanged: reused
    changed = tmp_path / "corpus" / "notes" / "doc001.txt"
    changed.write_text(changed.read_text() + "More.\n")
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    (tmp_path / "corpus" / "notes" / "doc002.txt").unlink()
    with pytest.raises(UserError, match=r"removed 1 \(.*doc002\.txt\); changed 1 \(.*doc001\.txt\)"):
        prepare(*args, vocab_size=TINY_VOCAB, val_fraction=0.2)


def test_a_build_is_served_where_its_sources_are_absent(tmp_path: Path) -> None:
    make_corpus(tmp_path / "corpus", n_docs=20)
    built = prepare([str(tmp_path / "corpus")], str(tmp_path / "data"), vocab_size=TINY_VOCAB, val_fraction=0.2)
    (tmp_path / "corpus").rename(tmp_path / "elsewhere")  # a training node without the raw corpus
    assert prepare([str(tmp_path / "corpus")], str(tmp_path / "data"), vocab_size=TINY_VOCAB, val_fraction=0.2) == built
    with pytest.raises(UserError, match="does not exist"):  # another request still needs its sources
        prepare([str(tmp_path / "corpus")], str(tmp_path / "data"), vocab_size=TINY_VOCAB, val_fraction=0.3)


def test_exact_duplicates_are_kept_once_and_counted(tmp_path: Path) -> None:
    rng = random.Random(4)
    unique = [one_file_text(rng, rng.randint(1, 5)) for _ in range(60)]
    copies = [unique[i % 10] for i in range(25)]  # some copies may fall into the other split than the first
    texts = unique + copies
    rng.shuffle(texts)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    manifest = prepare([str(tmp_path / "c.jsonl")], str(tmp_path / "data"), vocab_size=TINY_VOCAB, val_fraction=0.3)
    kept = decoded_documents(tmp_path / "data", "train") + decoded_documents(tmp_path / "data", "val")
    assert sorted(kept) == sorted(unique)  # every text once, in one split: no copy in train of a val text
    assert manifest["duplicate_documents"] == len(copies)


def test_the_tokenizer_sample_is_bounded_and_from_training_documents(tmp_path: Path) -> None:
    write_sources(tmp_path / "corpus", {"books": 300, "code": 300, "web": 300})
    units = plan_units(resolve_sources([str(tmp_path / "corpus")]).files, 0.1)
    total = sum(unit.size for unit in units)
    sample = list(
        sample_for_tokenizer(
            [(units, DocumentSplit(0.1))], "text", total // 10, tmp_path / "s", Ranks(), progress=False
        )
    )
    sampled = sum(len(text) for text in sample)
    assert 0.05 * total <= sampled <= 0.15 * total
    assert {max(source_shares(text), key=source_shares(text).get) for text in sample} == set(ALPHABETS)
    manifest = prepare(
        [str(tmp_path / "corpus")], str(tmp_path / "data"), vocab_size=TINY_VOCAB, tokenizer_sample_bytes="20KB"
    )
    assert manifest["request"]["tokenizer"] == {"train_vocab_size": TINY_VOCAB, "sample_bytes": 20_000}


@pytest.mark.parametrize("option", ["chunk_bytes", "tokenizer_sample_bytes"])
def test_a_size_that_is_not_one_is_refused(tmp_path: Path, option: str) -> None:
    make_corpus(tmp_path / "corpus", n_docs=5)
    with pytest.raises(UserError, match=rf"data\.{option}='16 MiB' is not a positive size; write it like 16MB"):
        prepare([str(tmp_path / "corpus")], str(tmp_path / "data"), **{option: "16 MiB"})
    assert not (tmp_path / "data").exists()


def test_invalid_utf8_in_a_parquet_string_column_is_repaired(tmp_path: Path) -> None:
    rows = pa.array([b"caf\xe9 cr\xe8me", *(f"good text {i}".encode() for i in range(9))], pa.binary()).view(
        pa.string()
    )
    pq.write_table(pa.table({"text": rows}), tmp_path / "rows.parquet")
    manifest = prepare(
        [str(tmp_path / "rows.parquet")], str(tmp_path / "data"), vocab_size=TINY_VOCAB, val_fraction=0.3
    )
    assert manifest["invalid_utf8_documents"] == 1
    kept = decoded_documents(tmp_path / "data", "train") + decoded_documents(tmp_path / "data", "val")
    assert "caf\ufffd cr\ufffdme" in kept


def test_sources_in_a_bucket_are_read_through_fsspec(tmp_path: Path) -> None:
    """fsspec's in-memory filesystem stands in for s3:// or hf://: the same listing, range reads and checks."""
    rng, fs, root = random.Random(6), fsspec.filesystem("memory"), f"/corpus-{tmp_path.name}"
    web = [source_text(rng, "pqrst", 30) for _ in range(40)]
    fs.pipe(f"{root}/web/a.jsonl.gz", gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in web).encode()))
    books = [one_file_text(rng, 30) for _ in range(3)]
    for i, text in enumerate(books):
        fs.pipe(f"{root}/books/b{i}.txt", text.encode())
    rows = [source_text(rng, "hjklm", 20) for _ in range(30)]
    with fs.open(f"{root}/rows.parquet", "wb") as out:
        pq.write_table(pa.table({"text": rows}), out, row_group_size=10)
    sources = [f"memory://{root}/web/*.jsonl.gz", f"memory://{root}/books", f"memory://{root}/rows.parquet"]
    manifest = prepare(sources, str(tmp_path / "data"), vocab_size=TINY_VOCAB, val_fraction=0.2)
    kept = decoded_documents(tmp_path / "data", "train") + decoded_documents(tmp_path / "data", "val")
    assert sorted(kept) == sorted(web + books + rows)
    assert manifest["layout"]["units"] == 1 + 3 + 3  # the gzipped file whole, each book, each row group
    listing = json.loads((tmp_path / "data" / "files.json").read_text())
    assert [path for path, _, _ in listing][:1] == [f"memory://{root}/web/a.jsonl.gz"]
    fs.pipe(f"{root}/books/new.txt", b"A new book.\n")
    with pytest.raises(UserError, match=r"added 1 \(memory://.*/books/new\.txt\)"):
        prepare(sources, str(tmp_path / "data"), vocab_size=TINY_VOCAB, val_fraction=0.2)
    fs.rm(root, recursive=True)


@pytest.mark.parametrize("with_jsonl", [False, True])
def test_text_over_a_piece_holds_out_its_share_beside_other_sources(tmp_path: Path, with_jsonl: bool) -> None:
    rng = random.Random(8)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "book.txt").write_text(one_file_text(rng, 30_000))  # ~1.5 MiB: cut for its size
    if with_jsonl:
        texts = [one_file_text(rng, 5) for _ in range(2000)]
        (tmp_path / "corpus" / "web.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    manifest = prepare([str(tmp_path / "corpus")], str(tmp_path / "data"), vocab_size=TINY_VOCAB, val_fraction=0.05)
    assert manifest["pieces"] >= 10 / 0.05  # enough pieces for validation to get its share of them
    assert 0.035 <= manifest["splits"]["val"]["share"] <= 0.07


def test_a_source_present_but_changed_is_never_served_as_absent(tmp_path: Path) -> None:
    make_corpus(tmp_path / "a", n_docs=10)
    make_corpus(tmp_path / "b", n_docs=10, seed=1)
    sources = [str(tmp_path / "a"), str(tmp_path / "b")]
    prepare(sources, str(tmp_path / "data"), vocab_size=TINY_VOCAB, val_fraction=0.2)
    pq.write_table(pa.table({"content": ["no text column"]}), tmp_path / "a" / "new.parquet")
    with pytest.raises(UserError, match=r"new\.parquet has no column 'text'"):
        prepare(sources, str(tmp_path / "data"), vocab_size=TINY_VOCAB, val_fraction=0.2)
    (tmp_path / "a" / "new.parquet").unlink()
    (tmp_path / "b").rename(tmp_path / "b-elsewhere")  # one source gone, the other here: not a training node
    with pytest.raises(UserError, match="does not exist"):
        prepare(sources, str(tmp_path / "data"), vocab_size=TINY_VOCAB, val_fraction=0.2)


def test_dictionary_encoded_parquet_text_a_byte_order_mark_and_gzip_sizes(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rows = [f"row {i} text" for i in range(20)]
    pq.write_table(pa.table({"text": pa.array(rows).dictionary_encode()}), corpus / "rows.parquet")
    web = [f"line {i} text" for i in range(20)]
    (corpus / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps({"text": t}) + "\n" for t in web).encode())
    packed = "".join(json.dumps({"text": t * 50}) + "\n" for t in web).encode()
    (corpus / "packed.jsonl.gz").write_bytes(gzip.compress(packed))
    files = resolve_sources([str(corpus)]).files
    gz_unit = next(unit for unit in plan_units(files, 0.2) if unit.path.endswith(".gz"))
    assert gz_unit.text_size == len(packed) > gz_unit.size  # sampling and buckets count the text, not the gzip
    manifest = prepare([str(corpus)], str(tmp_path / "data"), vocab_size=TINY_VOCAB, val_fraction=0.2)
    kept = decoded_documents(tmp_path / "data", "train") + decoded_documents(tmp_path / "data", "val")
    assert sorted(kept) == sorted(rows + web + [t * 50 for t in web])
    assert manifest["skipped_records"] == {"malformed": 0, "empty": 0}
