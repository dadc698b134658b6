"""A compiled model resumes bit for bit under ``trainer.deterministic: true`` (the quickstart's setting): 12 steps
straight against 7 + 5 resumed, each run in its own process, as after a restart."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pretrain.train.compile_check import missing_compiler
from tests.helpers.runs import assert_ok, run_main, scalars_by_step, tiny_fit_args

STEPS = 12


def compiled_args(corpus_root: Path, data_dir: Path, logs: Path, max_steps: int, *extra: str) -> list[str]:
    return tiny_fit_args(
        corpus_root,
        data_dir,
        logs,
        "--model.compile",
        "true",
        "--trainer.max_steps",
        str(max_steps),
        "--model.lr_scheduler.init_args.max_steps",
        str(STEPS),
        "--checkpoint.every_n_train_steps",
        "7",
        *extra,
    )


@pytest.mark.skipif(missing_compiler(torch.device("cpu")) is not None, reason="compiling on a CPU needs a C++ compiler")
def test_a_compiled_run_resumes_bit_for_bit(corpus, prepared: Path, tmp_path: Path) -> None:
    whole = run_main(*compiled_args(corpus[0], prepared, tmp_path / "whole", STEPS), cwd=tmp_path)
    assert_ok(whole)
    for max_steps, resume in ((7, ()), (STEPS, ("--ckpt_path", "last"))):
        half = run_main(*compiled_args(corpus[0], prepared, tmp_path / "halves", max_steps, *resume), cwd=tmp_path)
        assert_ok(half)
    reference = scalars_by_step(tmp_path / "whole" / "quickstart" / "version_0", "train/loss")
    assert len(reference) == STEPS
    assert scalars_by_step(tmp_path / "halves" / "quickstart" / "version_0", "train/loss") == reference
