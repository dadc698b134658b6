"""Preparation killed half-way, in a real process: nothing half-built is ever served, and a rerun redoes it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.data import PretrainData
from pretrain.data.build import prepare, read_manifest
from pretrain.errors import UserError
from tests.conftest import make_corpus
from tests.helpers import TINY_VOCAB
from tests.test_data import decoded_documents


def test_preparation_killed_halfway_is_redone(tmp_path: Path) -> None:
    docs = make_corpus(tmp_path / "corpus", n_docs=60)
    data_dir = tmp_path / "data"
    options = {"sources": f"[{tmp_path / 'corpus'}]", "data_dir": data_dir, "vocab_size": TINY_VOCAB, "num_workers": 1}
    command = [sys.executable, "-m", "pretrain.prepare", *(f"--data.{k}={v}" for k, v in options.items())]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (data_dir / ".build").exists() and process.poll() is None:
        time.sleep(0.001)
    process.kill()  # the build is under way (its scratch folder exists until just before the manifest)
    process.wait()
    assert read_manifest(data_dir) is None
    with pytest.raises(UserError, match=r"manifest\.json is missing"):
        PretrainData(data_dir=str(data_dir), vocab_size=TINY_VOCAB).setup("fit")
    prepare([str(tmp_path / "corpus")], str(data_dir), vocab_size=TINY_VOCAB)
    texts = decoded_documents(data_dir, "train") + decoded_documents(data_dir, "val")
    assert sorted(texts) == sorted(docs.values())
