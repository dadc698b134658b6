"""Preparation killed or stopped half-way, in a real process: nothing half-built is ever served, no lock is left
in the way, and a rerun redoes it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.data import PretrainData
from pretrain.data.prepare.build import prepare
from pretrain.data.prepare.build_lock import LOCK_NAME
from pretrain.data.prepare.manifest import read_manifest
from pretrain.errors import UserError
from tests.helpers.corpora import decoded_documents, make_corpus
from tests.helpers.runs import ROOT, TINY_VOCAB, assert_ok, tiny_fit_args


def test_preparation_killed_halfway_is_redone(tmp_path: Path) -> None:
    docs = make_corpus(tmp_path / "corpus", n_docs=60)
    data_dir = tmp_path / "data"
    options = {"sources": f"[{tmp_path / 'corpus'}]", "data_dir": data_dir, "vocab_size": TINY_VOCAB, "num_workers": 1}
    command = [sys.executable, "-m", "pretrain.commands.prepare", *(f"--data.{k}={v}" for k, v in options.items())]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not any(data_dir.glob(".build-*")) and process.poll() is None:
        time.sleep(0.001)
    process.kill()  # the build is under way (its scratch folder exists until just before the manifest)
    process.wait()
    assert read_manifest(data_dir) is None
    assert (data_dir / LOCK_NAME).exists()  # left behind by a killed builder: its process is gone, so it is stale
    with pytest.raises(UserError, match=r"manifest\.json is missing"):
        PretrainData(data_dir=str(data_dir), vocab_size=TINY_VOCAB).setup("fit")
    prepare([str(tmp_path / "corpus")], str(data_dir), vocab_size=TINY_VOCAB)
    texts = decoded_documents(data_dir, "train") + decoded_documents(data_dir, "val")
    assert sorted(texts) == sorted(docs.values())
    assert not (data_dir / LOCK_NAME).exists() and not any(data_dir.glob(".build-*"))


def stop_the_build_with_sigterm(command: list[str], data_dir: Path, cwd: Path) -> None:
    """Start ``command``, send SIGTERM once its build is under way: status 143, one line, no lock, no manifest."""
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not any(data_dir.glob(".build-*")) and process.poll() is None:
        time.sleep(0.001)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "SIGTERM: stopped building" in err and "Traceback" not in err, err[-3000:]
    assert not (data_dir / LOCK_NAME).exists() and read_manifest(data_dir) is None


def test_sigterm_during_preparation_ends_it_cleanly(tmp_path: Path) -> None:
    """As a scheduler or torchrun stops a job: status 143, one line saying so, the lock removed."""
    make_corpus(tmp_path / "corpus", n_docs=60)
    data_dir = tmp_path / "data"
    command = [
        sys.executable,
        "-m",
        "pretrain.commands.prepare",
        f"--data.sources=[{tmp_path / 'corpus'}]",
        f"--data.data_dir={data_dir}",
        f"--data.vocab_size={TINY_VOCAB}",
    ]
    stop_the_build_with_sigterm(command, data_dir, tmp_path)
    prepare([str(tmp_path / "corpus")], str(data_dir), vocab_size=TINY_VOCAB)
    assert read_manifest(data_dir) is not None and not any(data_dir.glob(".build-*"))


def test_sigterm_during_the_build_inside_fit_ends_it_cleanly_and_the_next_fit_builds(tmp_path: Path) -> None:
    """``fit`` on a fresh machine builds in ``prepare_data`` first: a scheduler's SIGTERM then stops the build as it
    stops ``pretrain prepare``, and the next ``fit`` builds and trains."""
    make_corpus(tmp_path / "corpus", n_docs=60)
    data_dir = tmp_path / "data"
    fit = [
        sys.executable,
        str(ROOT / "main.py"),
        *tiny_fit_args(tmp_path / "corpus", data_dir, tmp_path / "logs", "--trainer.max_steps", "2"),
    ]
    stop_the_build_with_sigterm(fit, data_dir, tmp_path)
    again = subprocess.run(fit, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert_ok(again)
    assert read_manifest(data_dir) is not None
