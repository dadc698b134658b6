"""Stop a run, resume it with --ckpt_path last, and get the uninterrupted run's losses (in this process; signals
and kill -9 are in tests/e2e/test_preemption.py)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import warnings
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import patch

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from pretrain.checkpointing.callback import PretrainCheckpoint
from pretrain.train.module import PretrainModule
from pretrain.train.schedules import WarmupCosineLR
from tests.helpers.resume import STEPS, fit_args
from tests.helpers.runs import ROOT, TINY_MODEL, assert_ok, run_quietly, scalars_by_step, tiny_fit_args


@pytest.fixture(scope="module")
def reference(corpus, prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """Per-step train/loss of the uninterrupted run."""
    logs = tmp_path_factory.mktemp("reference")
    run_quietly(fit_args(corpus[0], prepared, logs, STEPS), logs)
    return scalars_by_step(logs / "quickstart" / "version_0", "train/loss")


def test_resume_after_a_clean_end(corpus, prepared: Path, tmp_path: Path, reference: dict[int, float], run_cli) -> None:
    first = run_cli(*fit_args(corpus[0], prepared, tmp_path, 30))
    assert_ok(first)
    resumed = run_cli(*fit_args(corpus[0], prepared, tmp_path, STEPS, "--ckpt_path", "last"))
    assert_ok(resumed)
    assert "Resuming" in resumed.stderr
    assert sorted(p.name for p in (tmp_path / "quickstart").iterdir()) == ["version_0"]  # same run folder
    assert scalars_by_step(tmp_path / "quickstart" / "version_0", "train/loss") == reference  # bit-exact


def test_extending_a_finished_run_stretches_its_schedule(corpus, prepared: Path, tmp_path: Path, run_cli) -> None:
    """The schedule's length follows trainer.max_steps on resume, and its peak the configured LR."""
    cosine = ("--config", str(ROOT / "configs" / "adamw-cosine.yaml"), "--model.overrides", TINY_MODEL)
    warmup = (*cosine, "--model.lr_scheduler.init_args.warmup_steps", "4")
    for max_steps, extra in ((20, ()), (40, ("--ckpt_path", "last", "--model.optimizer.init_args.lr", "0.002"))):
        args = tiny_fit_args(corpus[0], prepared, tmp_path, "--trainer.max_steps", str(max_steps), *warmup, *extra)
        result = run_cli(*args)
        assert_ok(result)
    logged = scalars_by_step(tmp_path / "quickstart" / "version_0", "train/lr")
    first, longer = WarmupCosineLR(sgd(0.003), 4, max_steps=20), WarmupCosineLR(sgd(0.002), 4, max_steps=40)
    assert [logged[step] for step in range(20)] == pytest.approx([0.003 * first.lr_factor(s) for s in range(20)])
    expected = [0.002 * longer.lr_factor(step) for step in range(20, 40)]
    assert [logged[step] for step in range(20, 40)] == pytest.approx(expected)
    assert logged[20] > 2 * logged[19]  # the run had reached its floor; the longer cosine is half-way


def sgd(lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)


def test_ckpt_path_last_without_a_previous_run_starts_fresh(corpus, prepared: Path, tmp_path: Path, run_cli) -> None:
    result = run_cli(*fit_args(corpus[0], prepared, tmp_path, 2, "--ckpt_path", "last"))
    assert_ok(result)
    assert "starting a new run" in result.stderr
    assert (tmp_path / "quickstart" / "version_0" / "checkpoints" / "last.ckpt").exists()


def test_ckpt_path_last_without_a_versioned_logger_is_left_to_lightning(
    corpus, prepared: Path, tmp_path: Path, run_cli
) -> None:
    """Without a logger, Lightning keeps checkpoints in ./checkpoints and finds `last` there itself."""
    no_logger = ("--trainer.logger", "false", "--ckpt_path", "last")
    with pytest.warns(UserWarning, match="there is no last checkpoint available"):  # or a stale one was resumed
        first = run_cli(*fit_args(corpus[0], prepared, tmp_path, 2, *no_logger))
    assert_ok(first)
    last = tmp_path / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 2
    saved["step_guard"]["skipped_steps"] = 7  # a mark only a run resumed from this very file carries on
    torch.save(saved, last)
    second = run_cli(*fit_args(corpus[0], prepared, tmp_path, 4, *no_logger))
    assert_ok(second)
    resumed = torch.load(last, weights_only=True)
    assert (resumed["global_step"], resumed["step_guard"]["skipped_steps"]) == (4, 7)


def test_random_number_streams_continue_after_restore() -> None:
    module = PretrainModule(overrides={"d_model": 32, "n_layer": 1, "n_head": 2, "n_kv_head": 2}, vocab_size=64)
    module.configure_model()
    trainer = SimpleNamespace(global_step=0)  # what the guard's read needs
    module.step_guard.read(trainer)
    checkpoint = {"state_dict": module.state_dict()}
    with patch.object(type(module), "trainer", trainer):
        module.on_save_checkpoint(checkpoint)
    expected = (torch.rand(4), random.random())
    torch.manual_seed(123)  # as a new process would start
    random.seed(123)
    module.on_load_checkpoint(checkpoint)
    assert torch.equal(torch.rand(4), expected[0]) and random.random() == expected[1]


class SignalAfterSanityCheck(L.Callback):
    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's own handler is in place here


def test_a_signal_before_training_starts_is_handled_with_a_checkpoint(tmp_path: Path) -> None:
    module = PretrainModule(
        overrides={"d_model": 32, "n_layer": 1, "n_head": 2, "n_kv_head": 2}, vocab_size=64, seq_len=8
    )
    checkpoint = PretrainCheckpoint(dirpath=tmp_path, every_n_train_steps=100, save_last="link")
    data = DataLoader(torch.randint(0, 64, (40, 9)), batch_size=2)
    trainer = L.Trainer(
        max_steps=50,
        callbacks=[checkpoint, SignalAfterSanityCheck()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data, data)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 1  # saved after one step


def test_resuming_with_a_different_batch_per_step_warns_with_the_fix(tmp_path: Path) -> None:
    data = DataLoader(torch.randint(0, 64, (40, 9)), batch_size=2)

    def fit(accumulate: int, max_steps: int, ckpt_path: Path | None = None) -> None:
        module = PretrainModule(
            overrides={"d_model": 32, "n_layer": 1, "n_head": 2, "n_kv_head": 2}, vocab_size=64, seq_len=8
        )
        checkpoint = PretrainCheckpoint(dirpath=tmp_path, every_n_train_steps=100, save_last="link")
        trainer = L.Trainer(
            max_steps=max_steps,
            accumulate_grad_batches=accumulate,
            callbacks=[checkpoint],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, data, ckpt_path=ckpt_path)

    fit(accumulate=2, max_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(accumulate=2, max_steps=3, ckpt_path=tmp_path / "last.ckpt")  # the same batch: no warning
    assert not [w for w in caught if "resumes with" in str(w.message)]
    with pytest.warns(UserWarning, match="resumes with") as caught:
        fit(accumulate=4, max_steps=4, ckpt_path=tmp_path / "last.ckpt")
    (message,) = [str(w.message) for w in caught if "resumes with" in str(w.message)]
    assert "saved with 1 process(es) x 2 micro-batch(es)" in message and "resumes with 1 process(es) x 4" in message
    assert message.endswith("To keep the batch, set --trainer.accumulate_grad_batches 2.")


def test_resuming_with_accumulation_leaves_the_restored_checkpoint_as_it_was(tmp_path: Path) -> None:
    data = DataLoader(torch.randint(0, 64, (40, 9)), batch_size=2)
    for max_steps, ckpt_path in ((2, None), (4, tmp_path / "last.ckpt")):
        module = PretrainModule(
            overrides={"d_model": 32, "n_layer": 1, "n_head": 2, "n_kv_head": 2}, vocab_size=64, seq_len=8
        )
        checkpoint = PretrainCheckpoint(dirpath=tmp_path, filename="{step:07d}", every_n_train_steps=2, save_top_k=-1)
        trainer = L.Trainer(
            max_steps=max_steps,
            accumulate_grad_batches=2,
            callbacks=[checkpoint],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, data, ckpt_path=ckpt_path)
        if ckpt_path is None:
            saved = (tmp_path / "step=0000002.ckpt").read_bytes()
            shutil.copy(tmp_path / "step=0000002.ckpt", ckpt_path := tmp_path / "last.ckpt")
    assert (tmp_path / "step=0000002.ckpt").read_bytes() == saved  # not saved again mid-step after the resume
    assert torch.load(tmp_path / "step=0000004.ckpt", weights_only=True)["global_step"] == 4


class SignalAtBatch(L.Callback):
    def __init__(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if batch_idx == self.batch_idx:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_signal_during_gradient_accumulation_saves_at_the_end_of_the_step(tmp_path: Path) -> None:
    module = PretrainModule(
        overrides={"d_model": 32, "n_layer": 1, "n_head": 2, "n_kv_head": 2}, vocab_size=64, seq_len=8
    )
    checkpoint = PretrainCheckpoint(dirpath=tmp_path, every_n_train_steps=100, save_last="link")
    trainer = L.Trainer(
        max_steps=50,
        accumulate_grad_batches=4,
        callbacks=[checkpoint, SignalAtBatch(13)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(torch.randint(0, 64, (400, 9)), batch_size=2))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    completed = saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"]
    # Batch 13 is the 2nd of step 4's 4 micro-batches. Saved after the step's last one (batch 15), which
    # counts as completed only once the hook returns, as in periodic saves: resuming starts step 5.
    assert (saved["global_step"], completed) == (4, 15)


class CtrlCTwice(L.Callback):
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if batch_idx == 5:
            os.kill(os.getpid(), signal.SIGINT)  # the first: finish the step, save, stop ...
            os.kill(os.getpid(), signal.SIGINT)  # ... unless a second comes first: stop now


def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path: Path) -> None:
    module = PretrainModule(
        overrides={"d_model": 32, "n_layer": 1, "n_head": 2, "n_kv_head": 2}, vocab_size=64, seq_len=8
    )
    checkpoint = PretrainCheckpoint(dirpath=tmp_path, every_n_train_steps=100, save_last="link")
    trainer = L.Trainer(
        max_steps=50,
        callbacks=[checkpoint, CtrlCTwice()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # As in a terminal (a suite started in the background inherits SIGINT ignored, which the run respects).
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit) as exit_info:  # Lightning's way out of a KeyboardInterrupt
            trainer.fit(module, DataLoader(torch.randint(0, 64, (400, 9)), batch_size=2))
    finally:
        signal.signal(signal.SIGINT, handler)
    assert exit_info.value.code == 1
    assert list(tmp_path.iterdir()) == []  # no checkpoint
    assert trainer.global_step == 5  # the interrupted step did not finish


class RecordsTheSigintHandler(L.Callback):
    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        self.handler = signal.getsignal(signal.SIGINT)


def test_a_run_started_immune_to_ctrl_c_stays_so(tmp_path: Path) -> None:
    """Shells start background jobs with SIGINT ignored: a Ctrl-C meant for the foreground must not stop them."""
    module = PretrainModule(
        overrides={"d_model": 32, "n_layer": 1, "n_head": 2, "n_kv_head": 2}, vocab_size=64, seq_len=8
    )
    recorder = RecordsTheSigintHandler()
    trainer = L.Trainer(
        max_steps=2,
        callbacks=[PretrainCheckpoint(dirpath=tmp_path), recorder],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        trainer.fit(module, DataLoader(torch.randint(0, 64, (8, 9)), batch_size=2))
        assert recorder.handler is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, handler)
