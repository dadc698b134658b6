"""Resumed runs compared with uninterrupted ones."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from pretrain.data.block_reader import BlockReader
from tests.helpers.runs import Result, assert_ok, scalars_by_step, tiny_fit_args

STEPS = 60


def fit_args(corpus_root: Path, data_dir: Path, logs: Path, max_steps: int, *extra: str) -> list[str]:
    """The tiny run with 2 loader workers; the LR schedule is pinned to STEPS so runs stay comparable."""
    return tiny_fit_args(
        corpus_root,
        data_dir,
        logs,
        "--data.num_workers",
        "2",
        "--trainer.max_steps",
        str(max_steps),
        "--model.lr_scheduler.init_args.max_steps",
        str(STEPS),
        *extra,
    )


TRAINED_STEPS = 50  # validated at 20 and 40 (the interval) and at 50 (the last step)


def check_mixture_resume(
    run: Callable[..., Result], built: Path, mixture: dict, tmp_path: Path, processes: int
) -> None:
    """16 steps straight vs 11 + 5 with --ckpt_path last and two loader workers, stopped in the middle
    of the letters' epoch; the digits restart during the second part. (Per process 8 sequences a step:
    the digits hold too few for 16.)"""
    processes_args = (
        "--trainer.devices",
        str(processes),
        "--data.batch_size",
        str(16 // processes),
        *(("--trainer.strategy", "ddp") if processes > 1 else ()),
    )
    extra = (
        "--data.sources",
        "null",
        "--data.mixture",
        json.dumps(mixture),
        "--data.num_workers",
        "2",
        *processes_args,
        "--model.lr_scheduler.init_args.max_steps",
        "16",
        "--model.lr_scheduler.init_args.warmup_steps",
        "4",
        "--checkpoint.every_n_train_steps",
        "11",
        "--checkpoint.save_top_k",
        "-1",
    )
    whole = run(*tiny_fit_args(Path("unused"), built, tmp_path / "whole", *extra, "--trainer.max_steps", "16"))
    assert_ok(whole)
    for max_steps, resume in (("11", ()), ("16", ("--ckpt_path", "last"))):
        half = run(
            *tiny_fit_args(
                Path("unused"), built, tmp_path / "halves", *extra, "--trainer.max_steps", max_steps, *resume
            )
        )
        assert_ok(half)
    reference = scalars_by_step(tmp_path / "whole" / "quickstart" / "version_0", "train/loss")
    assert len(reference) == 16
    assert scalars_by_step(tmp_path / "halves" / "quickstart" / "version_0", "train/loss") == reference

    def digits_pass(step: int) -> int:
        path = tmp_path / "whole" / "quickstart" / "version_0" / "checkpoints" / f"step={step:07d}.ckpt"
        state = torch.load(path, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
        blocks = BlockReader([built / "digits" / "train"], state["block_len"]).sizes[0]
        return state["taken"][state["datasets"].index("digits")] // blocks

    assert digits_pass(16) > digits_pass(11)
