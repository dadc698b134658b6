"""Preparation shared over a torchrun group: 4 processes build exactly what 1 builds (tokenizer, shards, byte for
byte), and a failure on one rank ends every rank with its message instead of leaving them waiting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers.corpora import small_build_options, write_corpus
from tests.helpers.runs import assert_ok


def prepare(corpus: Path, data_dir: Path, processes: int) -> subprocess.CompletedProcess:
    options = small_build_options(corpus, data_dir)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    return subprocess.run(
        [*launcher, "-m", "pretrain.commands.prepare", *options],
        cwd=data_dir.parent,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_four_processes_build_exactly_what_one_builds(tmp_path: Path) -> None:
    write_corpus(tmp_path / "corpus")
    one, four = prepare(tmp_path / "corpus", tmp_path / "one", 1), prepare(tmp_path / "corpus", tmp_path / "four", 4)
    assert_ok(one)
    assert_ok(four)
    manifests = [json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("one", "four")]
    assert manifests[0]["layout"]["processes"] == 1 and manifests[1]["layout"]["processes"] == 4
    assert len(manifests[1]["peak_rss_mb"]) == 4
    assert manifests[0]["layout"]["units"] >= 8 and manifests[0]["pieces"] > 0
    for key in ("request", "tokenizer", "splits", "duplicate_documents", "pieces", "skipped_records"):
        assert manifests[0][key] == manifests[1][key], key
    built = {
        name: sorted(p.relative_to(tmp_path / name) for p in (tmp_path / name).rglob("*") if p.is_file())
        for name in ("one", "four")
    }
    assert built["one"] == built["four"]
    assert len([p for p in built["one"] if p.name.startswith("chunk-")]) > 4
    for path in built["one"]:
        if path.name != "manifest.json":  # it holds each build's timings
            assert (tmp_path / "one" / path).read_bytes() == (tmp_path / "four" / path).read_bytes(), path
    assert "Tokenizing (rank 0 of 4)" in four.stderr


def test_a_failure_on_one_rank_ends_every_rank_with_its_message(tmp_path: Path) -> None:
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.parquet").write_bytes(b"PAR1 not really parquet PAR1")
    (tmp_path / "corpus" / "b.txt").write_text("text\n")
    result = prepare(tmp_path / "corpus", tmp_path / "data", 2)
    assert result.returncode != 0
    assert "a.parquet" in result.stderr
    assert not (tmp_path / "data" / "manifest.json").exists()
