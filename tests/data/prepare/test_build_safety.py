"""Data you can trust on the preparation side: sources are only read, a build removes only what a build wrote, one
builder works in a data_dir at a time, and every chunk's checksum is recorded and checked by ``--verify``."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pretrain.data import PretrainData
from pretrain.data.prepare import build as build_module
from pretrain.data.prepare import build_lock
from pretrain.data.prepare.build import prepare, prepare_mixture
from pretrain.data.prepare.build_lock import LOCK_NAME, STALE_SECONDS, WAIT_VARIABLE, BuildLock
from pretrain.data.prepare.manifest import MANIFEST_VERSION, read_manifest
from pretrain.data.prepare.ownership import MARKER
from pretrain.data.prepare.verify import (
    sha256_of,
    verify_build,
    verify_chunk_digests,
    verify_token_ids,
    verify_tokenizer_files,
)
from pretrain.errors import UserError
from tests.helpers.corpora import make_corpus
from tests.helpers.runs import QUICKSTART, TINY_VOCAB


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root``, byte for byte."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def build(corpus: Path, data_dir: Path, **options) -> dict:
    return prepare([str(corpus)], str(data_dir), **{"vocab_size": TINY_VOCAB, "val_fraction": 0.2, **options})


@pytest.fixture
def small_corpus(tmp_path: Path) -> Path:
    make_corpus(tmp_path / "corpus", n_docs=12)
    (tmp_path / "corpus" / "train").mkdir()  # a corpus folder named like a build output
    (tmp_path / "corpus" / "train" / "kept.txt").write_text("a training text the corpus owns\n")
    return tmp_path / "corpus"


# Sources are read-only.


@pytest.mark.parametrize(
    ("sources", "data_dir", "relation"),
    [
        (["corpus/train"], "corpus", "holds"),  # the command that used to delete corpus/train
        (["corpus"], "corpus/data", "lies inside"),
        (["corpus"], "corpus", "is"),
        (["corpus/**/*.txt"], "corpus/out", "lies inside"),
        (["corpus/more/*.txt"], "corpus", "holds"),
    ],
)
def test_a_data_dir_among_the_sources_is_refused_and_every_source_file_stays(
    small_corpus: Path, run_cli, sources: list[str], data_dir: str, relation: str
) -> None:
    before = snapshot(small_corpus)
    result = run_cli(
        "prepare",
        "--config",
        QUICKSTART,
        "--data.sources",
        f"[{', '.join(sources)}]",
        "--data.data_dir",
        data_dir,
        "--data.vocab_size",
        str(TINY_VOCAB),
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert f"data.data_dir {data_dir} {relation} the source {sources[0]}" in errors[0]
    assert "point data.data_dir at a folder outside them" in errors[0]
    assert snapshot(small_corpus) == before


def test_a_mixture_dataset_whose_sources_hold_the_data_dir_is_refused(small_corpus: Path) -> None:
    before = snapshot(small_corpus)
    mixture = {
        "notes": {"sources": [str(small_corpus / "notes")], "weight": 1},
        "all": {"sources": [str(small_corpus)], "weight": 1},
    }
    with pytest.raises(UserError, match=r"lies inside the source .*corpus:"):
        prepare_mixture(mixture, str(small_corpus / "mix"), vocab_size=TINY_VOCAB)
    assert snapshot(small_corpus) == before


def test_a_glob_that_cannot_reach_the_data_dir_is_fine(small_corpus: Path) -> None:
    manifest = build(small_corpus / "more" / "*.txt", small_corpus / "more" / "data")
    assert manifest["splits"]["train"]["documents"] > 0


# Only what a build wrote is removed.


@pytest.mark.parametrize("output", ["train", "val", "evals", "tokenizer_files", "tokenizer.json", "manifest.json"])
def test_an_output_name_a_build_did_not_make_is_refused_and_left_as_it_was(
    small_corpus: Path, tmp_path: Path, output: str
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "notes.md").write_text("the user's own file, under no output name\n")
    if output.endswith(".json"):
        (data_dir / output).write_text('{"mine": true}\n')
    else:
        (data_dir / output).mkdir()
        (data_dir / output / "mine.bin").write_bytes(b"\x00\x01 not a build's")
    before = snapshot(data_dir)
    with pytest.raises(UserError, match=rf"{output} is a (folder|file) that preparation did not make.*data_dir"):
        build(small_corpus, data_dir)
    assert snapshot(data_dir) == before


def test_a_folder_named_like_a_mixture_dataset_is_refused_unless_a_build_made_it(mixture: dict, tmp_path: Path):
    data_dir = tmp_path / "mix"
    (data_dir / "letters").mkdir(parents=True)
    (data_dir / "letters" / "draft.txt").write_text("the user's letters\n")
    before = snapshot(data_dir)
    with pytest.raises(UserError, match=r"mix/letters is a folder that preparation did not make"):
        prepare_mixture(mixture, str(data_dir), vocab_size=TINY_VOCAB, val_fraction=0.1)
    assert snapshot(data_dir) == before
    (data_dir / "letters" / "draft.txt").unlink()  # an empty folder has nothing to lose
    prepare_mixture(mixture, str(data_dir), vocab_size=TINY_VOCAB, val_fraction=0.1)
    assert verify_build(data_dir)["mixture"].keys() == mixture.keys()


def test_a_data_dir_with_unrelated_files_is_built_and_they_stay(small_corpus: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    (data_dir / "notes").mkdir(parents=True)
    (data_dir / "notes" / "plan.txt").write_text("mine\n")
    (data_dir / "README").write_text("mine too\n")
    build(small_corpus, data_dir)
    build(small_corpus, data_dir, overwrite=True, chunk_bytes="8KB")  # a rebuild clears only the build's files
    assert (data_dir / "notes" / "plan.txt").read_text() == "mine\n"
    assert (data_dir / "README").read_text() == "mine too\n"
    assert all((data_dir / name / MARKER).is_file() for name in ("", "train", "val", "evals"))


def test_a_given_tokenizer_inside_the_data_dir_is_kept(small_corpus: Path, tmp_path: Path) -> None:
    build(small_corpus, tmp_path / "first")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "tokenizer.json").write_bytes((tmp_path / "first" / "tokenizer.json").read_bytes())
    before = (data_dir / "tokenizer.json").read_bytes()
    build(small_corpus, data_dir, tokenizer=str(data_dir / "tokenizer.json"))
    assert (data_dir / "tokenizer.json").read_bytes() == before


@pytest.mark.parametrize("next_tokenizer", ["trained", "another file"])
def test_a_given_tokenizer_kept_in_place_stays_the_user_s_in_later_builds(
    small_corpus: Path, tmp_path: Path, next_tokenizer: str
) -> None:
    build(small_corpus, tmp_path / "first")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    mine = (tmp_path / "first" / "tokenizer.json").read_bytes()
    (data_dir / "tokenizer.json").write_bytes(mine)
    build(small_corpus, data_dir, tokenizer=str(data_dir))  # the folder, as a model's is given
    build(small_corpus, tmp_path / "other", vocab_size=TINY_VOCAB + 16)
    other = {"trained": None, "another file": str(tmp_path / "other" / "tokenizer.json")}[next_tokenizer]
    before = snapshot(data_dir)
    with pytest.raises(UserError, match=r"data/tokenizer.json is the tokenizer an earlier build was given in place"):
        build(small_corpus, data_dir, overwrite=True, tokenizer=other)
    assert snapshot(data_dir) == before
    build(small_corpus, data_dir, overwrite=True, tokenizer=str(data_dir / "tokenizer.json"))  # given again: kept
    assert (data_dir / "tokenizer.json").read_bytes() == mine
    (data_dir / "tokenizer.json").unlink()  # moved away by its owner: the next build may write its own
    build(small_corpus, data_dir, overwrite=True)
    build(small_corpus, data_dir, overwrite=True, tokenizer=str(data_dir))  # reusing the build's own: still its own
    build(small_corpus, data_dir, overwrite=True)


def test_a_given_tokenizer_s_files_are_copied_and_a_rebuild_removes_only_the_copies(
    small_corpus: Path, tmp_path: Path
) -> None:
    build(small_corpus, tmp_path / "first")
    model = tmp_path / "model"  # a public model's folder: its tokenizer files, and others that are not
    model.mkdir()
    (model / "tokenizer.json").write_bytes((tmp_path / "first" / "tokenizer.json").read_bytes())
    companions = {
        "tokenizer_config.json": b'{"chat_template": "{{ messages }}", "bos_token": "<|endoftext|>"}',
        "chat_template.jinja": b"{% for m in messages %}{{ m.content }}{% endfor %}",
        "tokenizer.model": bytes(range(256)),  # a SentencePiece model is binary
    }
    for name, content in companions.items():
        (model / name).write_bytes(content)
    (model / "generation_config.json").write_text("{}")
    before = snapshot(model)
    manifest = build(small_corpus, tmp_path / "data", tokenizer=str(model / "tokenizer.json"))  # the file's folder
    copies = tmp_path / "data" / "tokenizer_files"
    assert manifest["tokenizer"]["files"] == {name: sha256_of(model / name) for name in sorted(companions)}
    assert {name: (copies / name).read_bytes() for name in companions} == companions
    assert not (copies / "generation_config.json").exists()
    assert snapshot(model) == before
    manifest = build(small_corpus, tmp_path / "data", overwrite=True)  # a trained tokenizer brings none
    assert manifest["tokenizer"]["files"] == {}
    assert not copies.exists()
    assert snapshot(model) == before


def test_a_build_of_another_manifest_version_is_rebuilt(small_corpus: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    build(small_corpus, data_dir)
    manifest = read_manifest(data_dir)
    (data_dir / "manifest.json").write_text(json.dumps({**manifest, "version": 3}))
    assert build(small_corpus, data_dir)["version"] == MANIFEST_VERSION  # rebuilt, not refused


# One builder per data_dir.


def test_the_lock_is_gone_after_a_build_and_after_one_that_failed(small_corpus: Path, tmp_path: Path, monkeypatch):
    data_dir = tmp_path / "data"
    build(small_corpus, data_dir)
    assert not (data_dir / LOCK_NAME).exists()
    assert not list(data_dir.glob(".build-*"))
    (data_dir / ".build-mine").mkdir()  # named like a scratch folder, but not a build's
    (data_dir / ".build-mine" / "notes.txt").write_text("mine\n")

    def fail(*args, **kwargs):
        raise RuntimeError("the disk is full")

    monkeypatch.setattr(build_module, "build_shards", fail)
    with pytest.raises(RuntimeError, match="disk is full"):
        build(small_corpus, data_dir, overwrite=True, chunk_bytes="8KB")
    assert not (data_dir / LOCK_NAME).exists()
    assert len(list(data_dir.glob(".build-*"))) == 2  # the failed build's scratch, marked as a build's
    monkeypatch.undo()
    build(small_corpus, data_dir, chunk_bytes="8KB")
    assert [p.name for p in data_dir.glob(".build-*")] == [".build-mine"]  # the next builder cleared its own


def write_lock(data_dir: Path, host: str, pid: int, age: float = 0.0) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = data_dir / LOCK_NAME
    lock.write_text(json.dumps({"host": host, "pid": pid, "token": "x", "started": "2026-01-01T00:00:00+00:00"}))
    os.utime(lock, (time.time() - age, time.time() - age))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_stale_lock_is_taken_over_with_a_warning(small_corpus: Path, tmp_path: Path, caplog) -> None:
    write_lock(tmp_path / "dead", socket.gethostname(), dead_pid())
    write_lock(tmp_path / "silent", "another-host", 12345, age=STALE_SECONDS + 60)
    write_lock(tmp_path / "reused", socket.gethostname(), os.getpid())  # as a restarted container finds it
    with caplog.at_level(logging.WARNING):
        for name in ("dead", "silent", "reused"):
            build(small_corpus, tmp_path / name)
    warnings = [r.getMessage() for r in caplog.records if "Taking over" in r.getMessage()]
    assert len(warnings) == 3
    assert "that process has ended" in warnings[0] and "no heartbeat for 6 minutes" in warnings[1]
    assert "left by an earlier process with this process id" in warnings[2]
    for name in ("dead", "silent", "reused"):
        assert read_manifest(tmp_path / name) and not (tmp_path / name / LOCK_NAME).exists()


def test_a_second_builder_waits_for_the_first_then_builds(small_corpus: Path, tmp_path: Path, caplog):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    first = BuildLock(data_dir)
    first.acquire()  # a live builder: this process
    served: list[dict] = []
    with caplog.at_level(logging.INFO):
        second = threading.Thread(target=lambda: served.append(build(small_corpus, data_dir)))
        second.start()
        time.sleep(2.5)
        assert second.is_alive() and [p.name for p in data_dir.iterdir()] == [LOCK_NAME]  # waiting, nothing made
        first.release()
        second.join(timeout=120)
    assert not second.is_alive() and served and read_manifest(data_dir)  # then built it
    waits = [r.getMessage() for r in caplog.records if "waiting for that build to end" in r.getMessage()]
    assert len(waits) == 1 and f"{socket.gethostname()} pid {os.getpid()}" in waits[0]
    assert not (data_dir / LOCK_NAME).exists()


def test_a_builder_that_finds_a_matching_build_after_waiting_serves_it(small_corpus: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    build(small_corpus, data_dir)
    chunk = next((data_dir / "train").glob("*.bin"))
    stamp = chunk.stat().st_mtime_ns
    first = BuildLock(data_dir)
    first.acquire()
    second = threading.Thread(target=lambda: build(small_corpus, data_dir))
    second.start()
    time.sleep(1.5)
    first.release()
    second.join(timeout=60)
    assert chunk.stat().st_mtime_ns == stamp  # served, not rebuilt


def test_the_wait_is_bounded_on_request(small_corpus: Path, tmp_path: Path, monkeypatch) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    holder = BuildLock(data_dir)
    holder.acquire()
    monkeypatch.setenv(WAIT_VARIABLE, "0.5")
    try:
        with pytest.raises(UserError, match=rf"still being built by .* after waiting 0.5 s \({WAIT_VARIABLE}\)"):
            build(small_corpus, data_dir)
    finally:
        holder.release()
    monkeypatch.setenv(WAIT_VARIABLE, "soon")
    with pytest.raises(UserError, match=rf"{WAIT_VARIABLE}='soon' is not a number of seconds"):
        build(small_corpus, data_dir)


def test_a_build_that_cannot_be_written_is_served_without_the_lock(prepared: Path, corpus, monkeypatch) -> None:
    def read_only(path, flags, *args):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(build_lock.os, "open", read_only)
    manifest = prepare([str(corpus[0])], str(prepared), vocab_size=TINY_VOCAB, val_fraction=0.1)
    assert manifest == read_manifest(prepared)


# Chunk checksums and --verify.


def test_the_manifest_holds_every_chunks_digest(prepared: Path, built: Path) -> None:
    manifest = read_manifest(prepared)
    chunks = sorted(str(p.relative_to(prepared)) for p in prepared.glob("*/chunk-*.bin"))
    assert sorted(manifest["chunks"]) == chunks
    assert all(sha256_of(prepared / name) == digest for name, digest in manifest["chunks"].items())
    mixture = read_manifest(built)
    for name in ("letters", "digits"):
        own = read_manifest(built / name)["chunks"]
        assert {f"{name}/{chunk}": digest for chunk, digest in own.items()}.items() <= mixture["chunks"].items()
    assert len(mixture["chunks"]) == len(list(built.glob("*/*/chunk-*.bin")))
    verify_build(built)


def verify_command(corpus: Path, data_dir: Path) -> list[str]:
    return [
        "prepare",
        "--config",
        QUICKSTART,
        "--data.sources",
        f"[{corpus}]",
        "--data.data_dir",
        str(data_dir),
        "--data.vocab_size",
        str(TINY_VOCAB),
        "--verify",
    ]


def test_verify_passes_an_intact_build_and_names_a_damaged_chunk(small_corpus: Path, tmp_path: Path, run_cli):
    data_dir = tmp_path / "data"
    build(small_corpus, data_dir)
    result = run_cli(*verify_command(small_corpus, data_dir))
    assert result.returncode == 0, result.stderr
    assert "chunks match their checksums" in result.stdout
    chunk = sorted((data_dir / "val").glob("chunk-*.bin"))[-1]
    damaged = bytearray(chunk.read_bytes())
    damaged[-3] ^= 0x01  # one bit of one token: sizes and headers still match
    chunk.write_bytes(bytes(damaged))
    before = snapshot(data_dir)
    result = run_cli(*verify_command(small_corpus, data_dir))
    assert result.returncode == 2
    assert f"error: Shard {chunk} does not match its checksum" in result.stderr
    assert snapshot(data_dir) == before  # nothing rebuilt
    chunk.unlink()
    with pytest.raises(UserError, match=rf"Shard {chunk} is missing"):
        verify_chunk_digests(data_dir, read_manifest(data_dir))


def test_verify_names_the_shard_holding_a_token_id_outside_the_vocabulary(small_corpus: Path, tmp_path: Path, run_cli):
    data_dir = tmp_path / "data"
    manifest = build(small_corpus, data_dir)
    vocab_size = manifest["tokenizer"]["vocab_size"]
    chunk = sorted((data_dir / "train").glob("chunk-*.bin"))[0]
    raw = np.fromfile(chunk, dtype=np.uint8)
    count = int(raw[:4].view(np.uint32)[0])
    raw[4 * (count + 2) : 4 * (count + 2) + 2].view(np.uint16)[0] = vocab_size + 7  # the first token of the chunk
    raw.tofile(chunk)
    with pytest.raises(UserError, match=rf"Shard {chunk} holds token id {vocab_size + 7}, outside .* {vocab_size} ids"):
        verify_token_ids(data_dir / "train", vocab_size)
    manifest["chunks"][f"train/{chunk.name}"] = sha256_of(chunk)  # as if the build had been made so
    (data_dir / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli(*verify_command(small_corpus, data_dir))
    assert result.returncode == 2
    assert f"error: Shard {chunk} holds token id {vocab_size + 7}" in result.stderr


@pytest.mark.parametrize("edited", ["tokenizer.json", "tokenizer_files/tokenizer_config.json"])
def test_a_tokenizer_file_edited_after_the_build_is_refused_by_every_run_and_by_verify(
    small_corpus: Path, tmp_path: Path, edited: str
) -> None:
    build(small_corpus, tmp_path / "first")
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer.json").write_bytes((tmp_path / "first" / "tokenizer.json").read_bytes())
    (model / "tokenizer_config.json").write_text('{"bos_token": null}')
    data_dir = tmp_path / "data"
    build(small_corpus, data_dir, tokenizer=str(model))
    data = PretrainData(data_dir=str(data_dir), seq_len=16, batch_size=2, num_workers=0, vocab_size=TINY_VOCAB)
    data.setup("fit")  # as built: served
    path = data_dir / edited
    path.write_text(path.read_text().replace("null", '"<|endoftext|>"') + " ")  # a fix made by hand
    data = PretrainData(data_dir=str(data_dir), seq_len=16, batch_size=2, num_workers=0, vocab_size=TINY_VOCAB)
    with pytest.raises(UserError, match=rf"{path} changed since the build encoded its shards with it"):
        data.setup("fit")
    with pytest.raises(UserError, match=rf"{path} changed since the build"):
        verify_build(data_dir)
    path.unlink()
    with pytest.raises(UserError, match=rf"{path}, a file of the build in {data_dir}, is missing"):
        verify_tokenizer_files(data_dir, read_manifest(data_dir))
