import json
import multiprocessing
import os
import re
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from pretrain.data import PretrainData
from pretrain.data.loader_workers import kill_leftover_workers, leave_stopping_to_the_trainer
from pretrain.data.prepare.build import prepare
from pretrain.data.prepare.manifest import read_manifest
from pretrain.data.prepare.plan import DocumentSplit
from pretrain.data.prepare.readers import RawDocument
from pretrain.data.prepare.sources import resolve_sources, stdlib_files
from pretrain.data.prepare.tokenizer import eos_id, token_byte_lengths
from pretrain.data.shards import iter_documents
from pretrain.errors import UserError
from tests.helpers.corpora import decoded_documents, make_corpus
from tests.helpers.runs import QUICKSTART, TINY_VOCAB, assert_ok


def test_shards_decode_back_to_the_exact_documents(corpus, prepared: Path) -> None:
    _, docs = corpus
    train, val = decoded_documents(prepared, "train"), decoded_documents(prepared, "val")
    assert val and train
    assert Counter(train + val) == Counter(docs.values())  # each document once, byte for byte


def test_manifest_records_what_was_built(corpus, prepared: Path) -> None:
    manifest = read_manifest(prepared)
    assert manifest["request"]["sources"] == [str(corpus[0])]
    assert manifest["tokenizer"]["dtype"] == "uint16"
    assert manifest["tokenizer"]["vocab_size"] <= TINY_VOCAB
    for split in ("train", "val"):
        documents = list(iter_documents(prepared / split))
        counts = {"documents": len(documents), "tokens": sum(map(len, documents))}
        assert {key: manifest["splits"][split][key] for key in counts} == counts
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 40


def test_split_is_by_document_and_deterministic(corpus) -> None:
    files = resolve_sources([str(corpus[0])]).files
    documents = [RawDocument(file.key, "text") for file in files]
    val = {d.key for d in documents if DocumentSplit(0.2).of(d) == "val"}
    assert val == {d.key for d in reversed(documents) if DocumentSplit(0.2).of(d) == "val"}
    assert 2 <= len(val) <= 16


def test_prepare_reuses_a_matching_build_and_refuses_another(corpus, tmp_path: Path) -> None:
    root, _ = corpus
    prepare([str(root)], str(tmp_path), vocab_size=TINY_VOCAB)
    chunk = next((tmp_path / "train").glob("*.bin"))
    built_at = chunk.stat().st_mtime_ns
    prepare([str(root)], str(tmp_path), vocab_size=TINY_VOCAB)
    assert chunk.stat().st_mtime_ns == built_at  # nothing rebuilt
    with pytest.raises(UserError, match=r"data\.overwrite: true"):
        prepare([str(root / "notes")], str(tmp_path), vocab_size=TINY_VOCAB)
    assert read_manifest(tmp_path)["request"]["sources"] == [str(root)]  # refused build lost nothing
    manifest = prepare([str(root / "notes")], str(tmp_path), vocab_size=TINY_VOCAB, overwrite=True)
    assert manifest["request"]["sources"] == [str(root / "notes")]


def test_half_built_data_dir_is_rebuilt(corpus, tmp_path: Path) -> None:
    root, docs = corpus
    prepare([str(root)], str(tmp_path), vocab_size=TINY_VOCAB)
    (tmp_path / "manifest.json").unlink()  # as if killed before the build finished
    (tmp_path / "val" / "index.json").unlink()
    prepare([str(root)], str(tmp_path), vocab_size=TINY_VOCAB)
    assert Counter(decoded_documents(tmp_path, "train") + decoded_documents(tmp_path, "val")) == Counter(docs.values())


def test_given_tokenizer_is_used_as_is(prepared: Path, corpus, tmp_path: Path) -> None:
    tokenizer = str(prepared / "tokenizer.json")
    manifest = prepare([str(corpus[0])], str(tmp_path), tokenizer=tokenizer)
    assert manifest["tokenizer"]["sha256"] == read_manifest(prepared)["tokenizer"]["sha256"]
    assert PretrainData(tokenizer=tokenizer).vocab_size == Tokenizer.from_file(tokenizer).get_vocab_size()


def test_a_named_end_of_text_token_closes_each_document(prepared: Path, corpus, tmp_path: Path) -> None:
    """A tokenizer whose document end has none of the usual names (as DeepSeek's Llama-shaped models)."""
    model = tmp_path / "model"
    model.mkdir()
    renamed = (prepared / "tokenizer.json").read_text().replace("<|endoftext|>", "<|doc_end|>")
    (model / "tokenizer.json").write_text(renamed)
    with pytest.raises(UserError, match=re.escape("name the one that ends its documents with data.eos_token")):
        PretrainData(sources=[str(corpus[0])], data_dir=str(tmp_path / "data"), tokenizer=str(model))
    assert not (tmp_path / "data").exists()  # refused before anything is built
    with pytest.raises(UserError, match=re.escape("data.eos_token '<|none|>' is not a token of the tokenizer")):
        PretrainData(tokenizer=str(model), eos_token="<|none|>")
    data = PretrainData(
        sources=[str(corpus[0])], data_dir=str(tmp_path / "data"), tokenizer=str(model), eos_token="<|doc_end|>"
    )
    manifest = data.build()
    assert manifest["tokenizer"]["eos_id"] == Tokenizer.from_str(renamed).token_to_id("<|doc_end|>")
    documents = decoded_documents(tmp_path / "data", "train")  # each ends with exactly that token
    assert documents and not any("<|doc_end|>" in text for text in documents)


def test_a_named_beginning_token_opens_each_document_and_nothing_else_changes(
    prepared: Path, corpus, tmp_path: Path
) -> None:
    """data.bos_token (Llama 3's <|begin_of_text|>): each document is that token, its text, end-of-text."""
    model = tmp_path / "model"
    model.mkdir()
    tokenizer = Tokenizer.from_file(str(prepared / "tokenizer.json"))
    tokenizer.add_special_tokens(["<s>"])
    tokenizer.save(str(model / "tokenizer.json"))
    bos = tokenizer.token_to_id("<s>")
    for token, problem in (("<|none|>", "is not a token of the tokenizer"), ("<|endoftext|>", "is the end-of-text")):
        with pytest.raises(UserError, match=re.escape(f"data.bos_token {token!r} {problem}")):
            PretrainData(
                sources=[str(corpus[0])], data_dir=str(tmp_path / "data"), tokenizer=str(model), bos_token=token
            )
    with pytest.raises(UserError, match=re.escape("data.bos_token '<s>' names a token of a given tokenizer")):
        PretrainData(sources=[str(corpus[0])], data_dir=str(tmp_path / "data"), bos_token="<s>").build()
    assert not (tmp_path / "data").exists()  # refused before anything is built

    plain = prepare([str(corpus[0])], str(tmp_path / "plain"), tokenizer=str(model), val_fraction=0.1)
    data = PretrainData(
        sources=[str(corpus[0])],
        data_dir=str(tmp_path / "data"),
        tokenizer=str(model),
        bos_token="<s>",
        val_fraction=0.1,
    )
    manifest = data.build()
    assert (manifest["tokenizer"]["bos_id"], plain["tokenizer"]["bos_id"]) == (bos, None)
    assert manifest["request"]["tokenizer"]["bos_token"] == "<s>"  # a build without it is another build
    for split in ("train", "val"):
        with_bos = [ids.tolist() for ids in iter_documents(tmp_path / "data" / split)]
        without = [ids.tolist() for ids in iter_documents(tmp_path / "plain" / split)]
        assert with_bos == [[bos, *ids] for ids in without]  # the same documents, each opened with it
    questions = (tmp_path / "data" / "evals" / "next_line.jsonl").read_text()
    assert questions == (tmp_path / "plain" / "evals" / "next_line.jsonl").read_text()  # asked of the text alone
    data.setup("fit")
    lengths, _ = data.token_byte_table()
    assert lengths[bos] == 0 and data.state_dict()["bos_id"] == bos


def test_sources_globs_directories_and_files(tmp_path: Path) -> None:
    make_corpus(tmp_path, n_docs=8)
    (tmp_path / "notes" / "skip.bin").write_bytes(b"\x00\x01")
    (tmp_path / "notes" / "empty.txt").write_text("")
    from_dir = resolve_sources([str(tmp_path)]).files
    assert len(from_dir) == 8  # .bin passed over, empty file left out
    from_glob = resolve_sources([str(tmp_path / "**" / "*.md")]).files
    assert {Path(d.path).suffix for d in from_glob} == {".md"}
    one = str(tmp_path / "more" / "doc000.md")
    assert [d.path for d in resolve_sources([one, str(tmp_path / "more")]).files].count(one) == 1


@pytest.mark.parametrize("source", ["does/not/exist", "nothing/*.txt"])
def test_missing_source_is_named(source: str) -> None:
    with pytest.raises(UserError, match=r"does not exist|matches no files"):
        resolve_sources([source])


def test_stdlib_source_is_the_standard_library_without_tests() -> None:
    documents = stdlib_files()
    assert len(documents) > 300
    assert any(d.key == "stdlib/json/decoder.py" for d in documents)
    for document in documents:
        parts = Path(document.key).parts
        assert not {"test", "tests", "site-packages"} & set(parts), document.key
        assert document.path.startswith(sys.base_prefix) or "python" in document.path


def test_datamodule_serves_blocks_of_seq_len_plus_one(prepared: Path) -> None:
    data = PretrainData(data_dir=str(prepared), seq_len=16, batch_size=4, num_workers=0, vocab_size=TINY_VOCAB)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch.shape == (4, 17)
    assert batch.dtype == torch.uint16
    all_tokens = torch.cat([torch.from_numpy(d.astype("int64")) for d in iter_documents(prepared / "train")])
    start = int(torch.nonzero((all_tokens.unfold(0, 17, 1) == batch[0].long()).all(1))[0])
    assert torch.equal(all_tokens[start : start + 17], batch[0].long())  # a contiguous slice of the stream


def test_held_out_blocks_are_read_without_loader_workers(prepared: Path) -> None:
    """A worker forked at each validation would make the training process's pages fault again (datamodule.py)."""
    data = PretrainData(data_dir=str(prepared), seq_len=16, batch_size=4, num_workers=2, vocab_size=TINY_VOCAB)
    data.setup("fit")
    batches = 0
    for batch in data.val_dataloader():
        assert not multiprocessing.active_children()  # read here, by no forked worker
        assert batch.shape == (4, 17)
        batches += 1
    assert batches > 0


def test_datamodule_refuses_a_data_dir_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"manifest\.json is missing"):
        PretrainData(data_dir=str(tmp_path)).setup("fit")


def test_manifest_is_json_with_the_eos_id(prepared: Path) -> None:
    manifest = json.loads((prepared / "manifest.json").read_text())
    tokenizer = Tokenizer.from_file(str(prepared / "tokenizer.json"))
    assert tokenizer.id_to_token(manifest["tokenizer"]["eos_id"]) == "<|endoftext|>"


def test_prepare_alone_from_a_finished_runs_saved_config(trained: Path, tmp_path: Path, run_cli) -> None:
    """A run's config.yaml also holds fit's own options (ckpt_path, weights_only): prepare reads past them."""
    result = run_cli("prepare", "--config", str(trained / "config.yaml"), "--data.data_dir", str(tmp_path / "again"))
    assert_ok(result)
    assert read_manifest(tmp_path / "again")["splits"]["train"]["documents"] > 0


def test_prepare_alone_from_a_training_config(corpus, tmp_path: Path, run_cli) -> None:
    overrides = ["--data.sources", f"[{corpus[0]}]", "--data.data_dir", str(tmp_path), "--data.vocab_size", "320"]
    result = run_cli("prepare", "--config", QUICKSTART, *overrides)
    assert_ok(result)
    manifest = read_manifest(tmp_path)
    documents = manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"]
    assert f"documents  {documents:,}" in result.stdout and "tokens/s" in result.stdout
    assert manifest["request"]["sources"] == [str(corpus[0])] and manifest["tokenizer"]["vocab_size"] <= 320


def test_a_build_by_an_older_version_is_rebuilt(corpus, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Version 1 encoded special-token strings inside documents as end-of-text ids: its shards are not reused."""
    data_dir = tmp_path / "data"
    first = prepare([str(corpus[0])], str(data_dir), vocab_size=TINY_VOCAB, val_fraction=0.1)
    (data_dir / "manifest.json").write_text(json.dumps({**first, "version": 1}))
    with caplog.at_level("WARNING"):
        again = prepare([str(corpus[0])], str(data_dir), vocab_size=TINY_VOCAB, val_fraction=0.1)
    assert "built by an older version of this project (manifest version 1): rebuilding it" in caplog.text
    assert again["version"] == first["version"] and again["splits"] == first["splits"]
    assert read_manifest(data_dir)["version"] == first["version"]


def _ignore_sigterm_and_wait() -> None:
    leave_stopping_to_the_trainer(0)
    time.sleep(60)


def test_loader_workers_that_ignore_sigterm_are_killed_at_exit() -> None:
    """Python's exit stops daemonic children with SIGTERM and waits: a stuck loader worker would hold it."""
    worker = multiprocessing.get_context("fork").Process(target=_ignore_sigterm_and_wait, daemon=True)
    worker.start()
    time.sleep(0.5)
    worker.terminate()  # what Python's exit would send
    worker.join(timeout=1)
    assert worker.is_alive()  # ignored, as meant during training
    kill_leftover_workers()
    worker.join(timeout=5)
    assert not worker.is_alive()


def _trainer_with_a_worker(pids: multiprocessing.Queue) -> None:
    worker = multiprocessing.get_context("fork").Process(target=_ignore_sigterm_and_wait, daemon=True)
    worker.start()
    time.sleep(0.5)  # the worker has run its init
    pids.put(worker.pid)
    time.sleep(60)


def running(pid: int) -> bool:
    """Whether the process exists and is not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
def test_a_loader_worker_dies_with_a_trainer_killed_outright() -> None:
    """kill -9 of the training process (a lost rank, the out-of-memory killer) takes its loader workers too."""
    context = multiprocessing.get_context("fork")
    pids = context.Queue()
    trainer = context.Process(target=_trainer_with_a_worker, args=(pids,))
    trainer.start()
    worker = pids.get(timeout=20)
    assert running(worker)
    os.kill(trainer.pid, signal.SIGKILL)
    trainer.join(timeout=10)
    deadline = time.monotonic() + 10
    while running(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(worker)


def test_token_byte_lengths_add_up_to_the_bytes_of_the_text(prepared: Path) -> None:
    tokenizer = Tokenizer.from_file(str(prepared / "tokenizer.json"))
    tokenizer.encode_special_tokens = True
    lengths = token_byte_lengths(tokenizer)
    text = "Plain words, café, 日本語, 🙂, tabs\tand\r\nlines, <|endoftext|> as text.\n" * 3
    assert sum(lengths[i] for i in tokenizer.encode(text, add_special_tokens=False).ids) == len(text.encode())
    assert lengths[eos_id(tokenizer)] == 0
