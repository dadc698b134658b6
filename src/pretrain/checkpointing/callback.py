"""Checkpoints that make every run resumable: periodic, at the end, and on preemption signals."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn

from pretrain._compat import (
    ends_optimizer_step,
    last_checkpoint_saved,
    save_checkpoint_now,
    take_over_lightning_sigterm,
)
from pretrain.checkpointing.background import BackgroundWrites, host_copy
from pretrain.checkpointing.commit import commit_saves_by_rename, remove_unfinished_saves
from pretrain.data.loader_workers import STOP_SIGNALS

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file beside it, fsync, then rename over the target.

    A crash mid-save leaves the previous checkpoint untouched and never a torn file under a
    checkpoint's name (Lightning's default writes through the system temp dir and moves the file,
    which is a plain copy when that is another filesystem). With ``writes``, the state is copied to
    host memory and written in the background.
    """

    def __init__(self, writes: BackgroundWrites | None = None) -> None:
        super().__init__()
        self.writes = writes

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if self.writes is None:
            self._write(checkpoint, path, storage_options)
            return
        self.writes.wait()  # at most one save in flight
        copied = host_copy(checkpoint)
        self.writes.submit(lambda: self._write(copied, path, storage_options))

    def _write(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any) -> None:
        if "://" in str(path):  # object stores write whole objects: nothing can be torn
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class PretrainCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also saves when training ends and when the job is told to stop.

    On SIGTERM or SIGUSR1 (clusters send these before preempting or requeueing a job) the run
    finishes the current step, saves a checkpoint, points ``last`` at it and exits normally;
    ``--ckpt_path last`` then continues exactly where it stopped. In multi-process runs the
    ranks agree on stopping every ``signal_check_interval`` steps (a small all-reduce that waits for
    the GPU), not at every step.

    Args:
        signal_check_interval: Steps between the ranks' agreement on a stop signal (multi-process runs).
        async_save: Write checkpoints in the background: training waits only for the copy of the state to
            host memory (``pretrain.checkpointing.background``); the end of the run and a stop signal wait
            for the write. Each save's stall is logged as ``perf/checkpoint_block_sec``.
    """

    def __init__(self, *args, signal_check_interval: int = 10, async_save: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.signal_check_interval = signal_check_interval
        self._writes = BackgroundWrites() if async_save else None  # see pretrain.checkpointing.background
        self.blocked_sec: float | None = None  # how long the last save held up training
        self._received: int | None = None
        self.stopped_by: int | None = None  # the signal this process stopped for, once saved (None: another rank's)
        self._previous_handlers: dict[int, object] = {}
        self._step_metrics: tuple[int, dict[str, float]] | None = None  # see _save_checkpoint
        self._batch_layout: dict[str, int | None] | None = None  # this run's; saved for a resumed run to compare
        self._saved_batch_layout: dict[str, int | None] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO(self._writes)
        if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):  # they write folders in place
            commit_saves_by_rename(trainer.strategy, self._writes)
        if stage == "fit" and trainer.is_global_zero and self.dirpath and "://" not in str(self.dirpath):
            remove_unfinished_saves(Path(self.dirpath))

    def _link_checkpoint(self, trainer: L.Trainer, filepath: str, linkpath: str) -> None:
        """Point ``last`` at the new checkpoint in one rename, once it is written: never missing or dangling."""
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            self._after_writes(lambda: _relink(filepath, linkpath))
        trainer.strategy.barrier()

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        """The checkpoint a new one replaces goes only once the new one is written."""
        self._after_writes(lambda: trainer.strategy.remove_checkpoint(filepath))  # as Lightning removes one

    def _after_writes(self, work: Callable[[], Any]) -> None:
        if self._writes is None:
            work()
        else:
            self._writes.after_writes(work)

    def wait_for_writes(self, trainer: L.Trainer | None = None) -> None:
        """Return once every checkpoint asked for is on disk (at once without ``async_save``). With ``trainer``, on
        every rank together: a write that failed on one rank stops them all, rather than leaving the others
        waiting for it at the next collective."""
        if self._writes is None:
            return
        failure = None
        try:
            self._writes.wait()
        except Exception as error:
            failure = error
        failed = failure is not None
        if trainer is not None and trainer.world_size > 1:
            failed = trainer.strategy.reduce_boolean_decision(failed, all=False)
        if failure is not None:
            raise failure
        if failed:
            raise RuntimeError("A checkpoint write failed in another process of the run; its error says why.")

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        # Lightning hands a step's metrics to the loggers only after this hook; a run killed right
        # after the save would lose them for good. They travel in the checkpoint and are written
        # when the run resumes, so TensorBoard has no hole at the resumed step.
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        self._step_metrics = (trainer.global_step - 1, metrics)
        started = time.perf_counter()
        self.wait_for_writes(trainer)  # the previous save's, on every rank: at most one in flight
        super()._save_checkpoint(trainer, filepath)
        self.blocked_sec = time.perf_counter() - started
        if trainer.is_global_zero:
            for logger in trainer.loggers:  # a save's stall, beside the throughput it costs
                logger.log_metrics({"perf/checkpoint_block_sec": self.blocked_sec}, step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "step_metrics": self._step_metrics, "batch_layout": self._batch_layout}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning keeps the saved paths only where the save folder is spelled as it was; the same folder under
        another spelling (``./logs``, an absolute path) or moved keeps them too; and the run's ``last`` link is
        relinked, never saved again as ``last-v1`` (also when resuming a checkpoint saved before the link was)."""
        saved = state_dict.get("dirpath")
        if saved and self.dirpath and saved != self.dirpath and _same_folder(saved, self.dirpath, state_dict):
            state_dict = _respelled(state_dict, saved, self.dirpath)
        super().load_state_dict(state_dict)
        link = os.path.join(self.dirpath or "", self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
        if self.save_last == "link" and os.path.islink(link):  # ours, saved after this checkpoint: relinked
            self.last_model_path = link
        self._step_metrics = state_dict.get("step_metrics")
        self._saved_batch_layout = state_dict.get("batch_layout")

    def save_now(self, trainer: L.Trainer) -> None:
        """Save the current step (unless already saved) and point ``last`` at it."""
        save_checkpoint_now(self, trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self._step_metrics is not None and trainer.ckpt_path:  # resumed: rewrite the saved step's metrics
            step, metrics = self._step_metrics
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        self._batch_layout = batch_layout(trainer)
        if trainer.ckpt_path and self._saved_batch_layout not in (None, self._batch_layout):
            rank_zero_warn(batch_change_message(self._saved_batch_layout, self._batch_layout))
        # A SIGTERM since Lightning put its own handler in (during the sanity check) would make it end
        # the run after the next batch without a checkpoint: it is taken over and handled here instead.
        # Lightning (2.6) also broadcasts its own SIGTERM flag at every step of a multi-process run and reads
        # it on the host: a wait for the GPU each step. Its handler is replaced below, so that flag never
        # changes; the ranks agree on stopping in _stop_requested instead.
        self._received = signal.SIGTERM if take_over_lightning_sigterm(trainer) else None
        self.stopped_by = None
        for signum in STOP_SIGNALS:
            if signum == signal.SIGINT and signal.getsignal(signum) is signal.SIG_IGN:
                continue  # a background job whose shell made it immune to Ctrl-C stays so
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:  # a second Ctrl-C stops at once, without saving
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if self._received is None:
            self._received = signum

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args, **kwargs) -> None:
        if not ends_optimizer_step(trainer):  # mid-step: a save would lose the gradients gathered so far
            return  # (periodic saves included: after a resume Lightning would save the restored step again)
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        # The final step, or one after which something asked training to stop, is saved here like
        # periodic steps, so resuming from it behaves the same.
        if 0 < trainer.max_steps <= trainer.global_step or trainer.should_stop:
            self.save_now(trainer)
        if self._stop_requested(trainer):
            self.save_now(trainer)
            self.wait_for_writes(trainer)  # the job may be killed soon after: the checkpoint must be on disk
            self.stopped_by = self._received
            name = signal.Signals(self._received).name if self._received else "a stop signal on another rank"
            log.info(
                "Received %s: saved step %d to %s; continue with --ckpt_path last",
                name,
                trainer.global_step,
                last_checkpoint_saved(self),
            )
            trainer.should_stop = True

    def _stop_requested(self, trainer: L.Trainer) -> bool:
        if trainer.world_size == 1:
            return self._received is not None
        if trainer.global_step % self.signal_check_interval:
            return False
        return trainer.strategy.reduce_boolean_decision(self._received is not None, all=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save_now(trainer)  # training stopped early for another reason (max_time, a callback ...)
        self.wait_for_writes(trainer)
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        try:
            self.wait_for_writes()  # a checkpoint being written is finished: the resume starts from it
        except Exception as error:  # the run's own exception is the one reported
            log.warning("A checkpoint write failed too: %s", error)
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            if signum == signal.SIGINT and signal.getsignal(signum) is signal.SIG_IGN:
                continue  # Lightning's KeyboardInterrupt shutdown ignores further Ctrl-C until it is done
            signal.signal(signum, handler)
        self._previous_handlers.clear()


def _relink(filepath: str, linkpath: str) -> None:
    tmp = os.path.join(os.path.dirname(linkpath), f".{os.path.basename(linkpath)}.{os.getpid()}.tmp")
    os.symlink(os.path.relpath(filepath, os.path.dirname(linkpath)), tmp)
    os.replace(tmp, linkpath)


def _same_folder(saved: str, now: str, state: dict[str, Any]) -> bool:
    """Whether a checkpoint saved into ``saved`` belongs in ``now``: the same folder, or it moved there."""
    if "://" in saved or "://" in now:
        return False
    if os.path.isdir(saved) and os.path.isdir(now):
        return os.path.samefile(saved, now)
    last = state.get("last_model_path")
    return not os.path.exists(saved) and bool(last) and os.path.lexists(os.path.join(now, os.path.basename(last)))


def _respelled(state: dict[str, Any], saved: str, now: str) -> dict[str, Any]:
    """The callback's state with every path under ``saved`` written under ``now``."""

    def respell(path: Any) -> Any:
        if not isinstance(path, str) or not path:
            return path
        return os.path.join(now, os.path.relpath(path, saved))

    paths = ("best_model_path", "kth_best_model_path", "last_model_path")
    return {
        **state,
        "dirpath": now,
        **{key: respell(state[key]) for key in paths if key in state},
        "best_k_models": {respell(path): score for path, score in state.get("best_k_models", {}).items()},
    }


def batch_layout(trainer: L.Trainer) -> dict[str, int | None]:
    """What makes up one optimizer step's batch: processes x accumulated micro-batches x sequences."""
    return {
        "processes": trainer.world_size,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "micro_batch": getattr(trainer.datamodule, "batch_size", None),
    }


def batch_change_message(saved: dict[str, int | None], now: dict[str, int | None]) -> str:
    def describe(layout: dict[str, int | None]) -> str:
        return (
            f"{layout['processes']} process(es) x {layout['accumulate_grad_batches']} micro-batch(es) "
            f"of {layout['micro_batch'] or '?'} sequences"
        )

    message = (
        f"This run was saved with {describe(saved)} per optimizer step and resumes with {describe(now)}: each "
        "step now sees a different batch, while the learning-rate schedule and max_steps stay as they were."
    )
    if saved["micro_batch"] == now["micro_batch"]:
        sequences = saved["processes"] * saved["accumulate_grad_batches"]
        if sequences % now["processes"] == 0:
            message += f" To keep the batch, set --trainer.accumulate_grad_batches {sequences // now['processes']}."
    return message
