"""Host reads with two processes (DDP, FSDP2): none between logging steps but the preemption check, aligned
with them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.host_reads import check_host_reads, gpu_config_on_cpu
from tests.helpers.runs import assert_ok, run_main

# Two processes agree on stopping (preemption) every signal_check_interval steps: here on logging steps.
TWO_PROCESSES = ("--trainer.devices", "2", "--checkpoint.signal_check_interval", "4")
STRATEGIES = {
    "DDP": ("--trainer.strategy", "ddp", *TWO_PROCESSES),
    "FSDP2": ("--trainer.strategy", '{"class_path": "pretrain.train.FSDP2Strategy"}', *TWO_PROCESSES),
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_two_processes_read_nothing_back_between_logging_steps(
    corpus, prepared: Path, tmp_path: Path, strategy: str
) -> None:
    args = gpu_config_on_cpu(corpus[0], prepared, tmp_path, *STRATEGIES[strategy])
    result = run_main(*args, cwd=tmp_path, env={"RECORD_HOST_READS_DIR": str(tmp_path)})
    assert_ok(result)
    check_host_reads(tmp_path, processes=2)
