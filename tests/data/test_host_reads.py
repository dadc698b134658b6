"""Between logging steps, the training loop never waits for the GPU.

On a GPU, reading a tensor's value on the host (``.item()``, ``float()``, ``.tolist()``, a progress
bar) or turning a Python number into a GPU tensor waits for every kernel queued so far: the GPU then
idles while the host prepares the next step. A CPU run cannot time that, but it sees every such
operation (``tests.helpers.host_reads.HostReads``), in one process and in two (DDP, FSDP2).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from pretrain.callbacks.progress_bar import LossProgressBar
from pretrain.data import PretrainData
from pretrain.train.module import PretrainModule
from tests.helpers.host_reads import HostReads, check_host_reads, gpu_config_on_cpu
from tests.helpers.runs import TINY_VOCAB, assert_ok, scalars_by_step

RECIPE_SWITCHES = (
    "--model.attention_mask",
    "document",
    "--model.optimizer",
    "pretrain.train.MuonWithAdamW",
    "--model.spike_window",
    "4",
)


@pytest.mark.parametrize("switches", [(), RECIPE_SWITCHES], ids=["as-is", "document-mask-muon-spikes"])
def test_the_gpu_config_reads_nothing_back_between_logging_steps(
    corpus, prepared: Path, tmp_path: Path, run_cli, monkeypatch, switches
) -> None:
    """In one process; with two (DDP, FSDP2): tests/e2e/test_host_reads_processes.py."""
    monkeypatch.setenv("RECORD_HOST_READS_DIR", str(tmp_path))
    result = run_cli(*gpu_config_on_cpu(corpus[0], prepared, tmp_path, *switches))
    assert_ok(result)
    check_host_reads(tmp_path, processes=1)
    assert "loss=" in result.stdout  # the command line's progress bar shows the loss of the last logging step
    # The learning rate is logged only where the trainer writes (as a Python number it costs a host-to-GPU copy
    # that waits for the GPU).
    run_dir = tmp_path / "gpt2-124m" / "version_0"
    written = sorted(scalars_by_step(run_dir, "train/loss"))
    assert written == sorted(scalars_by_step(run_dir, "train/lr")) == [3, 7, 11]


class StepLabels(L.Callback):
    def __init__(self, reads: HostReads) -> None:
        self.reads = reads

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        self.reads.step = trainer.global_step


def test_the_progress_bar_and_the_learning_rate_cost_one_wait_per_logging_step_with_accumulation(
    prepared: Path,
) -> None:
    data = PretrainData(data_dir=str(prepared), seq_len=16, batch_size=2, num_workers=0, vocab_size=TINY_VOCAB)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module = PretrainModule(
        overrides={"d_model": 32, "n_layer": 1, "n_head": 2, "n_kv_head": 2, "ffn_dim": 64},
        vocab_size=TINY_VOCAB,
        seq_len=16,
    )
    bar, reads = LossProgressBar(), HostReads()
    trainer = L.Trainer(
        max_steps=4,
        accumulate_grad_batches=2,
        log_every_n_steps=2,
        callbacks=[bar, StepLabels(reads)],
        logger=CSVLogger(prepared.parent / "bar-logs"),
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    with reads:
        trainer.fit(module, DataLoader([batch] * 8, batch_size=None))
    bar_reads = {step: [w for w in where if "progress_bar.py" in w] for step, where in reads.by_step.items()}
    assert {step: len(where) for step, where in bar_reads.items() if where} == {1: 1, 3: 1}  # steps 2 and 4 end
    number_logs = {step: [w for w in where if "__to_tensor" in w] for step, where in reads.by_step.items()}
    assert {step: len(where) for step, where in number_logs.items() if where} == {1: 1, 3: 1}  # train/lr
    assert bar.loss == pytest.approx(float(trainer.logged_metrics["train/loss"]))  # the loss, not loss / 2
