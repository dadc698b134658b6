"""Preparation shared over a torchrun group: 4 processes build exactly what 1 builds (tokenizer, shards, byte for
byte), and a failure on one rank ends every rank with its message instead of leaving them waiting."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.helpers import TINY_VOCAB
from tests.test_build import ALPHABETS, one_file_text, source_text


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


def prepare(corpus: Path, data_dir: Path, processes: int) -> subprocess.CompletedProcess:
    options = [f"--data.sources=[{corpus}]", f"--data.data_dir={data_dir}", f"--data.vocab_size={TINY_VOCAB}",
               "--data.val_fraction=0.1", "--data.chunk_bytes=64KB", "--data.tokenizer_sample_bytes=300KB"]  # fmt: skip
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    return subprocess.run([*launcher, "-m", "pretrain.prepare", *options], cwd=data_dir.parent, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip


def test_four_processes_build_exactly_what_one_builds(tmp_path: Path) -> None:
    write_corpus(tmp_path / "corpus")
    one, four = prepare(tmp_path / "corpus", tmp_path / "one", 1), prepare(tmp_path / "corpus", tmp_path / "four", 4)
    assert one.returncode == 0, one.stderr[-3000:]
    assert four.returncode == 0, four.stderr[-3000:]
    manifests = [json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("one", "four")]
    assert manifests[0]["layout"]["processes"] == 1 and manifests[1]["layout"]["processes"] == 4
    assert len(manifests[1]["peak_rss_mb"]) == 4
    assert manifests[0]["layout"]["units"] >= 8 and manifests[0]["pieces"] > 0
    for key in ("request", "tokenizer", "splits", "duplicate_documents", "pieces", "skipped_records"):
        assert manifests[0][key] == manifests[1][key], key
    built = {name: sorted(p.relative_to(tmp_path / name) for p in (tmp_path / name).rglob("*") if p.is_file())
             for name in ("one", "four")}  # fmt: skip
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
