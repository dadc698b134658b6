"""Two processes on the CPU: the distributed code paths (DDP, per-rank data, rank agreement) end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.test_cli import ROOT, scalars, tiny_fit_args


def test_ddp_on_two_processes_trains_and_each_rank_reads_its_own_data(corpus, prepared: Path, tmp_path: Path) -> None:
    two_processes = ("--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.max_steps", "20")
    record = ("--trainer.callbacks+", "tests.helpers.RecordBatches")
    args = tiny_fit_args(corpus[0], prepared, tmp_path, *two_processes, *record)
    env = {**os.environ, "RECORD_BATCHES_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 20
    # Within an epoch (~9 batches per rank here) the ranks split the data: no sequence on both.
    sequences = [{tuple(seq) for batch in batches[:6] for seq in batch} for batches in ranks]
    assert len(sequences[0]) == len(sequences[1]) == 6 * 8
    assert not sequences[0] & sequences[1]
    run_dir = tmp_path / "quickstart" / "version_0"
    assert len(scalars(run_dir, "train/loss")) == 20 and scalars(run_dir, "val/loss")
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 20
