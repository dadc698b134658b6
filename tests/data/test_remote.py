"""A remote data_dir, offline: litdata's ``local:`` URLs take the same path as ``s3://`` (fetch the
manifest and tokenizer into a cache, then every chunk under the build's identity) without a network."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pretrain.data import PretrainData
from pretrain.data.identity import build_identity
from pretrain.data.prepare.build import prepare
from pretrain.errors import UserError
from tests.helpers.runs import TINY_VOCAB, assert_ok, scalars, tiny_fit_args


def first_batches(data_dir: str, cache_dir: Path | None = None, n: int = 3) -> list[torch.Tensor]:
    data = PretrainData(
        data_dir=data_dir,
        cache_dir=str(cache_dir) if cache_dir else None,
        vocab_size=TINY_VOCAB,
        val_fraction=0.1,
        seq_len=16,
        batch_size=4,
        num_workers=0,
    )
    if data.remote:
        data.prepare_data()  # fetches; a local build is already there
    data.setup("fit")
    return [batch for _, batch in zip(range(n), data.train_dataloader(), strict=False)]


def test_a_remote_build_serves_the_same_batches_from_its_copy_in_the_cache(prepared: Path, tmp_path: Path) -> None:
    before = sorted(p.relative_to(prepared) for p in prepared.rglob("*"))
    cache = tmp_path / "cache"
    remote = first_batches(f"local:{prepared}", cache)
    local = first_batches(str(prepared))
    assert all(torch.equal(a, b) for a, b in zip(remote, local, strict=True))
    assert (cache / "manifest.json").read_bytes() == (prepared / "manifest.json").read_bytes()
    assert (cache / "tokenizer.json").read_bytes() == (prepared / "tokenizer.json").read_bytes()
    copy = cache / build_identity(json.loads((prepared / "manifest.json").read_text()))
    for chunk in (prepared / "train").glob("*.bin"):  # every chunk, under the build's identity
        assert (copy / "train" / chunk.name).read_bytes() == chunk.read_bytes()
    assert sorted(p.relative_to(prepared) for p in prepared.rglob("*")) == before  # the build is only read


def test_a_build_uploaded_again_under_the_same_url_is_never_served_from_the_older_copy(
    corpus, prepared: Path, tmp_path: Path
) -> None:
    bucket, cache = tmp_path / "bucket", tmp_path / "cache"
    shutil.copytree(prepared, bucket)
    before = [batch.tolist() for batch in first_batches(f"local:{bucket}", cache)]
    shutil.rmtree(bucket)
    prepare([str(corpus[0])], str(bucket), vocab_size=TINY_VOCAB, val_fraction=0.1, chunk_bytes="2KB")  # another build
    after = [batch.tolist() for batch in first_batches(f"local:{bucket}", cache)]
    assert after == [batch.tolist() for batch in first_batches(str(bucket))]
    assert before != after
    assert len(list(cache.glob("*/train"))) == 2  # one copy per build


def test_a_damaged_chunk_in_the_bucket_is_named_and_never_served(prepared: Path, tmp_path: Path) -> None:
    bucket, cache = tmp_path / "bucket", tmp_path / "cache"
    shutil.copytree(prepared, bucket)
    chunk = sorted((bucket / "train").glob("*.bin"))[-1]
    damaged = bytearray(chunk.read_bytes())
    damaged[-1] ^= 0xFF
    chunk.write_bytes(bytes(damaged))
    with pytest.raises(UserError, match=rf"{chunk.name} does not match the digest its manifest records"):
        first_batches(f"local:{bucket}", cache)
    assert not list(cache.rglob(chunk.name))  # neither kept nor served on the next run


def test_a_remote_folder_without_a_finished_build_is_refused_with_the_fix(tmp_path: Path) -> None:
    (tmp_path / "half-built" / "train").mkdir(parents=True)
    with pytest.raises(UserError, match=r"must hold a finished build.*pretrain prepare"):
        first_batches(f"local:{tmp_path / 'half-built'}", tmp_path / "cache")


def test_fit_from_a_remote_data_dir(corpus, prepared: Path, tmp_path: Path, run_cli) -> None:
    remote = ("--data.data_dir", f"local:{prepared}", "--data.cache_dir", str(tmp_path / "cache"))
    args = tiny_fit_args(corpus[0], prepared, tmp_path / "logs", *remote, "--trainer.max_steps", "6")
    result = run_cli(*args)
    assert_ok(result)
    assert len(scalars(tmp_path / "logs" / "quickstart" / "version_0", "train/loss")) == 6


def test_a_given_tokenizer_s_files_come_with_a_remote_build_each_checked(corpus, prepared: Path, tmp_path: Path):
    model, bucket, cache = tmp_path / "model", tmp_path / "bucket", tmp_path / "cache"
    model.mkdir()
    shutil.copy(prepared / "tokenizer.json", model / "tokenizer.json")
    (model / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    prepare([str(corpus[0])], str(bucket), tokenizer=str(model), val_fraction=0.1)
    first_batches(f"local:{bucket}", cache)
    copy = cache / "tokenizer_files" / "tokenizer_config.json"
    assert copy.read_bytes() == (model / "tokenizer_config.json").read_bytes()
    (bucket / "tokenizer_files" / "tokenizer_config.json").write_text('{"chat_template": "changed"}')
    with pytest.raises(UserError, match=r"tokenizer_config.json does not match the digest its manifest records"):
        first_batches(f"local:{bucket}", cache)
    assert not copy.exists()  # the older copy is not kept either
