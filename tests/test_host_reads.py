"""Between logging steps, the training loop never waits for the GPU.

On a GPU, reading a tensor's value on the host (``.item()``, ``float()``, ``.tolist()``, a progress
bar) or turning a Python number into a GPU tensor waits for every kernel queued so far: the GPU then
idles while the host prepares the next step. A CPU run cannot time that, but it sees every such
operation (``tests.helpers.HostReads``), in one process and in two (DDP, FSDP2).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from pretrain.callbacks import LossProgressBar
from pretrain.data import PretrainData
from pretrain.module import PretrainModule
from tests.helpers import ROOT, TINY_MODEL, TINY_VOCAB, HostReads, scalars_by_step

LOGGING_STEPS = {3, 7, 11}  # global_step + 1 a multiple of log_every_n_steps (4)


def gpu_config_on_cpu(corpus_root: Path, data_dir: Path, logs: Path, *extra: str) -> list[str]:
    """configs/gpt2-124m.yaml over gpu.yaml (fused AdamW, clipping, NaN guard, progress bar, throughput), tiny, on
    CPU; its 700 warmup steps fit themselves to the 12 steps."""
    configs = ROOT / "configs"
    return ["fit", "--config", str(configs / "gpu.yaml"), "--config", str(configs / "gpt2-124m.yaml"),
            "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--model.compile", "false",
            "--model.preset", "tiny", "--model.overrides", TINY_MODEL,
            "--data.sources", f"[{corpus_root}]", "--data.data_dir", str(data_dir), "--data.val_fraction", "0.1",
            "--data.vocab_size", str(TINY_VOCAB), "--data.seq_len", "16", "--data.batch_size", "2",
            "--data.num_workers", "0", "--trainer.max_steps", "12", "--trainer.log_every_n_steps", "4",
            "--trainer.val_check_interval", "5", "--trainer.limit_val_batches", "2",
            "--trainer.logger.init_args.save_dir", str(logs),
            "--trainer.callbacks+", "tests.helpers.RecordHostReads", *extra]  # fmt: skip


def check_host_reads(record_dir: Path, processes: int) -> None:
    """No host read between logging steps or in a validation batch, on every rank."""
    for rank in range(processes):
        recorded = json.loads((record_dir / f"rank{rank}.json").read_text())
        reads = {int(step): where for step, where in recorded["by_step"].items() if step.isdigit()}
        assert set(reads) >= LOGGING_STEPS  # the recorder sees the reads that do happen
        assert recorded["validated_after"] == [4, 9, 11]  # the interval (5), and the last step
        quiet = set(range(1, 12)) - LOGGING_STEPS - {4, 9}  # step 0 sets things up once
        assert {step: reads[step] for step in quiet if step in reads} == {}
        validation_reads = {key: where for key, where in recorded["by_step"].items() if key.startswith("val")}
        assert validation_reads == {}  # validation batches do not wait either: only its end reads the loss


RECIPE_SWITCHES = ("--model.attention_mask", "document", "--model.optimizer", "pretrain.muon.MuonWithAdamW",
                   "--model.spike_window", "4")  # fmt: skip


@pytest.mark.parametrize("switches", [(), RECIPE_SWITCHES], ids=["as-is", "document-mask-muon-spikes"])
def test_the_gpu_config_reads_nothing_back_between_logging_steps(corpus, prepared: Path, tmp_path: Path, run_cli,
                                                                  monkeypatch, switches) -> None:  # fmt: skip
    """In one process; with two (DDP, FSDP2): tests/e2e/test_host_reads_processes.py."""
    monkeypatch.setenv("RECORD_HOST_READS_DIR", str(tmp_path))
    result = run_cli(*gpu_config_on_cpu(corpus[0], prepared, tmp_path, *switches))
    assert result.returncode == 0, result.stderr[-3000:]
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
    module = PretrainModule(overrides={"d_model": 32, "n_layer": 1, "n_head": 2, "n_kv_head": 2, "ffn_dim": 64},
                            vocab_size=TINY_VOCAB, seq_len=16)  # fmt: skip
    bar, reads = LossProgressBar(), HostReads()
    trainer = L.Trainer(max_steps=4, accumulate_grad_batches=2, log_every_n_steps=2, callbacks=[bar, StepLabels(reads)],
                        logger=CSVLogger(prepared.parent / "bar-logs"), enable_checkpointing=False,
                        enable_model_summary=False, accelerator="cpu")  # fmt: skip
    with reads:
        trainer.fit(module, DataLoader([batch] * 8, batch_size=None))
    bar_reads = {step: [w for w in where if "callbacks.py" in w] for step, where in reads.by_step.items()}
    assert {step: len(where) for step, where in bar_reads.items() if where} == {1: 1, 3: 1}  # steps 2 and 4 end
    number_logs = {step: [w for w in where if "__to_tensor" in w] for step, where in reads.by_step.items()}
    assert {step: len(where) for step, where in number_logs.items() if where} == {1: 1, 3: 1}  # train/lr
    assert bar.loss == pytest.approx(float(trainer.logged_metrics["train/loss"]))  # the loss, not loss / 2
