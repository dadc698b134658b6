"""Between logging steps, the training loop never waits for the GPU.

On a GPU, reading a tensor's value on the host (``.item()``, ``float()``, a progress bar) or turning a
Python number into a GPU tensor waits for every kernel queued so far: the GPU then idles while the
host prepares the next step. A CPU run cannot time that, but it sees every such operation: reads go
through ``aten._local_scalar_dense``, numbers becoming tensors through ``aten.lift_fresh``.
"""

from __future__ import annotations

import traceback
from collections import defaultdict
from pathlib import Path

import lightning as L
import pytest
from torch.utils._python_dispatch import TorchDispatchMode

from pretrain.callbacks import LossProgressBar
from pretrain.cli import PretrainCLI
from pretrain.data import PretrainData
from pretrain.module import PretrainModule
from tests.conftest import TINY_VOCAB
from tests.test_cli import ROOT, TINY_MODEL

HOST_OPS = ("aten._local_scalar_dense", "aten.lift_fresh")


class HostOps(TorchDispatchMode):
    """Records, per training step, where host reads and host-made tensors happen (data loading aside:
    batches are made on the host by design and copied to the GPU asynchronously from pinned memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.step: int | None = None
        self.by_step: dict[int, list[str]] = defaultdict(list)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.step is not None and str(func).startswith(HOST_OPS):
            frames = traceback.extract_stack()
            if not any("torch/utils/data/" in frame.filename for frame in frames):
                ours = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames if "/torch/" not in f.filename]
                self.by_step[self.step].append(f"{func} from {' < '.join(reversed(ours[-3:]))}")
        return func(*args, **(kwargs or {}))


class TrackSteps(L.Callback):
    """Tells the recorder which training step runs; validation is left out (it reads its results)."""

    def __init__(self, recorder: HostOps) -> None:
        self.recorder = recorder
        self.validated_after: set[int] = set()

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        self.recorder.step = trainer.global_step

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.recorder.step is not None:
            self.validated_after.add(self.recorder.step)
        self.recorder.step = None


def test_the_gpu_config_reads_nothing_back_between_logging_steps(corpus, prepared: Path, tmp_path: Path) -> None:
    """configs/gpt2-124m.yaml (fused AdamW, clipping, NaN guard, progress bar, throughput) on a tiny model."""
    args = ["--config", str(ROOT / "configs" / "gpt2-124m.yaml"),
            "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--model.compile", "false",
            "--model.preset", "tiny", "--model.overrides", TINY_MODEL,
            "--data.sources", f"[{corpus[0]}]", "--data.data_dir", str(prepared), "--data.val_fraction", "0.1",
            "--data.vocab_size", str(TINY_VOCAB), "--data.seq_len", "16", "--data.batch_size", "2",
            "--data.num_workers", "0", "--trainer.max_steps", "12", "--trainer.log_every_n_steps", "4",
            "--trainer.val_check_interval", "5", "--trainer.limit_val_batches", "2",
            "--model.lr_scheduler.init_args.warmup_steps", "2",
            "--trainer.logger.init_args.save_dir", str(tmp_path)]  # fmt: skip
    cli = PretrainCLI(PretrainModule, PretrainData, args=args, run=False, auto_configure_optimizers=False)
    recorder = HostOps()
    steps = TrackSteps(recorder)
    cli.trainer.callbacks.insert(0, steps)
    with recorder:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    logging_steps = {3, 7, 11}  # global_step + 1 a multiple of log_every_n_steps
    assert all(recorder.by_step[step] for step in logging_steps)  # the recorder sees the reads that do happen
    quiet = set(range(1, 12)) - logging_steps - steps.validated_after  # step 0 sets things up once
    assert steps.validated_after == {4, 9} and len(quiet) == 6
    assert {step: recorder.by_step[step] for step in quiet if recorder.by_step[step]} == {}
    bar = cli.trainer.progress_bar_callback  # the CLI's default: shows the loss of the last logging step
    assert isinstance(bar, LossProgressBar) and bar.loss == pytest.approx(cli.trainer.logged_metrics["train/loss"])
