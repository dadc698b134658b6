"""Two ``pretrain prepare`` processes started together on one data_dir (two nodes' first processes under ``fit`` on
a shared filesystem, a sweep): one builds, the other waits for it and serves its build, and what they leave is what
one process alone builds, byte for byte."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pretrain.data.prepare.build_lock import LOCK_NAME
from tests.helpers.corpora import small_build_options, write_corpus

RUN_BY_RUN = ("seconds", "peak_rss_mb")  # how long this build took and the memory it used


def start(corpus: Path, data_dir: Path) -> subprocess.Popen:
    options = small_build_options(corpus, data_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "pretrain.commands.prepare", *options],
        cwd=data_dir.parent,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def contents(data_dir: Path) -> dict[str, object]:
    """Every file under ``data_dir``; the manifest without what differs from run to run."""
    files: dict[str, object] = {
        str(p.relative_to(data_dir)): p.read_bytes() for p in data_dir.rglob("*") if p.is_file()
    }
    manifest = json.loads(files.pop("manifest.json"))
    files["manifest.json"] = {key: value for key, value in manifest.items() if key not in RUN_BY_RUN}
    return files


def test_two_builders_started_together_leave_what_one_builds_alone(tmp_path: Path) -> None:
    write_corpus(tmp_path / "corpus")
    alone = start(tmp_path / "corpus", tmp_path / "alone")
    _, err = alone.communicate(timeout=600)
    assert alone.returncode == 0, err[-3000:]
    expected = contents(tmp_path / "alone")
    assert LOCK_NAME not in expected and "manifest.json" in expected
    for attempt in range(3):
        data_dir = tmp_path / f"together-{attempt}"
        processes = [start(tmp_path / "corpus", data_dir) for _ in range(2)]
        errs = [process.communicate(timeout=600)[1] for process in processes]
        assert [process.returncode for process in processes] == [0, 0], [err[-3000:] for err in errs]
        assert contents(data_dir) == expected, attempt
        built = [err for err in errs if "Tokenizing" in err]
        assert len(built) == 1, errs  # the other one served that build
        waited = next(err for err in errs if "Tokenizing" not in err)
        assert "waiting for that build to end" in waited, waited[-3000:]
