"""What tests share: the tiny run's arguments, ways to run the command line, reading TensorBoard events, and
callbacks passed to a run by class path (``--trainer.callbacks+ tests.helpers.X``)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pretrain.commands.cli import main

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
TINY_VOCAB = 320  # 256 byte tokens + end-of-text + a few merges
TINY_MODEL = "{d_model: 64, n_layer: 2, n_head: 2, n_kv_head: 2, ffn_dim: 128}"


def tiny_fit_args(corpus_root: Path, data_dir: Path, logs: Path, *extra: str) -> list[str]:
    """The quickstart config shrunk to seconds, on the shared test corpus."""
    return [
        "fit",
        "--config",
        QUICKSTART,
        "--data.sources",
        f"[{corpus_root}]",
        "--data.data_dir",
        str(data_dir),
        "--data.vocab_size",
        str(TINY_VOCAB),
        "--data.val_fraction",
        "0.1",
        "--data.seq_len",
        "64",
        "--data.num_workers",
        "0",
        "--model.compile",
        "false",
        "--model.overrides",
        TINY_MODEL,
        "--trainer.max_steps",
        "40",
        "--trainer.val_check_interval",
        "20",
        "--trainer.limit_val_batches",
        "2",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.logger.init_args.save_dir",
        str(logs),
        "--trainer.enable_progress_bar",
        "false",
        "--checkpoint.every_n_train_steps",
        "20",
        *extra,
    ]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_in_process(
    args: list[str],
    cwd: Path,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> Result:
    """``pretrain ARGS`` in this process, from ``cwd``: its exit status, output, and log lines (with stderr).

    An exception other than the command's own exit escapes: in a terminal it would have been a traceback."""
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        try:
            main(args)
            status = 0
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    out, err = capsys.readouterr()
    return Result(status, out, err + caplog.text)


def run_quietly(args: list[str], cwd: Path) -> None:
    """``pretrain ARGS`` in this process, for fixtures shared by several tests (no capture fixtures there)."""
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        main(args)
    finally:
        os.chdir(previous)


def run_main(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> Result:
    """``python main.py ARGS`` in a new process, for the end-to-end tier."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    return Result(result.returncode, result.stdout, result.stderr)


def scalars(run_dir: Path, tag: str) -> list[float]:
    """Every value written under ``tag``, in order (a step written twice counts twice)."""
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [event.value for event in events.Scalars(tag)]


def scalars_by_step(run_dir: Path, tag: str) -> dict[int, float]:
    """{step: value}; where a resumed run logged a step again, its value wins."""
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


def scalars_tags(run_dir: Path) -> list[str]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return events.Tags()["scalars"]


def text_steps(run_dir: Path, tag: str = "samples/text_summary") -> list[int]:
    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    events.Reload()
    return [event.step for event in events.Tensors(tag)]


class RecordBatches(L.Callback):
    """Writes each rank's training batches (as token lists) to ``$RECORD_BATCHES_DIR/rank<N>.json``."""

    def __init__(self) -> None:
        self.batches: list[list[list[int]]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self.batches.append(batch.long().tolist())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = Path(os.environ["RECORD_BATCHES_DIR"]) / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.batches))


def assert_ok(result: Result | subprocess.CompletedProcess) -> None:
    """A command that must have succeeded; the end of its error output shows why it did not."""
    assert result.returncode == 0, result.stderr[-3000:]


def assert_clean_failure(result: Result, *fragments: str) -> None:
    """A failed command that said why; in this process, any exception other than the command's exit escapes."""
    assert result.returncode != 0
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr[-3000:]
