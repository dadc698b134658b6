"""Two processes on the CPU: the distributed code paths (DDP, per-rank data, rank agreement) end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.data.prepare.build import prepare
from pretrain.data.shards import verify_split
from tests.helpers.processes import wait_for_checkpoint
from tests.helpers.runs import ROOT, TINY_VOCAB, assert_ok, scalars, tiny_fit_args


def test_ddp_on_two_processes_trains_and_each_rank_reads_its_own_data(corpus, prepared: Path, tmp_path: Path) -> None:
    two_processes = ("--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.max_steps", "20")
    record = ("--trainer.callbacks+", "tests.helpers.runs.RecordBatches")
    args = tiny_fit_args(corpus[0], prepared, tmp_path, *two_processes, *record)
    env = {**os.environ, "RECORD_BATCHES_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert_ok(result)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 20
    # Within an epoch (~9 batches per rank here) the ranks split the data: no sequence on both.
    sequences = [{tuple(seq) for batch in batches[:6] for seq in batch} for batches in ranks]
    assert len(sequences[0]) == len(sequences[1]) == 6 * 8
    assert not sequences[0] & sequences[1]
    run_dir = tmp_path / "quickstart" / "version_0"
    assert len(scalars(run_dir, "train/loss")) == 20 and scalars(run_dir, "val/loss")
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 20


def _prepare_on_rank_zero(rank: int, rendezvous: str, corpus_root: str, data_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        if rank == 0:  # as Lightning's prepare_data: one process per node builds, the others wait
            prepare([corpus_root], data_dir, vocab_size=TINY_VOCAB, val_fraction=0.1)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_first_build_inside_a_process_group_does_not_wait_for_the_other_ranks(corpus, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    context = mp.spawn(
        _prepare_on_rank_zero, args=(str(tmp_path / "rendezvous"), str(corpus[0]), str(data_dir)), nprocs=2, join=False
    )
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("Preparing on one rank waited for shards from ranks that write none.")
    for split in ("train", "val"):
        verify_split(data_dir / split)
    assert json.loads((data_dir / "manifest.json").read_text())["splits"]["val"]["documents"] > 0


def test_a_signal_to_one_rank_stops_both_at_the_same_step_with_a_checkpoint(corpus, prepared: Path, tmp_path: Path):
    """Only rank 0 (the launching process) is told to stop; the ranks agree at the next signal check."""
    args = tiny_fit_args(
        corpus[0],
        prepared,
        tmp_path,
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--trainer.max_steps",
        "2000",
    )
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    checkpoints = tmp_path / "quickstart" / "version_0" / "checkpoints"
    wait_for_checkpoint(process, checkpoints, "step=0000020.ckpt")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    assert "Received SIGTERM: saved step" in stderr
    stopped_at = torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"]
    # Where the ranks agreed (checkpoint.signal_check_interval): step 20 itself when the signal lands between that
    # step's save and its agreement check, both at the end of step 20's batch (as in tests/e2e/test_torchrun.py).
    assert 20 <= stopped_at < 2000 and stopped_at % 10 == 0
    time.sleep(1)
    assert subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True).returncode == 1  # rank 1 is gone too
