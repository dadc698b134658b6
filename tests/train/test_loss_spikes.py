"""Loss spikes: detected on the device, skipped, counted; a streak stops the run with the command that rolls back
past their batches, and ``data.skip_batches`` does that."""

from __future__ import annotations

import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from pretrain.checkpointing.callback import PretrainCheckpoint
from pretrain.data import PretrainData
from pretrain.errors import TrainingDiverged, UserError
from pretrain.model.losses import LossTerms
from pretrain.train.loss_spikes import LossSpikeDetector
from pretrain.train.module import PretrainModule
from tests.helpers.runs import TINY_VOCAB, assert_ok, tiny_fit_args

TINY = {"d_model": 32, "n_layer": 1, "n_head": 2, "n_kv_head": 2, "ffn_dim": 64}


def test_a_value_far_above_the_window_is_a_spike_and_stays_out_of_it() -> None:
    detector = LossSpikeDetector(window=4, sigmas=3.0)
    norm = torch.tensor(1.0)
    verdicts = [detector.check(torch.tensor(loss), norm).item() for loss in (9.0, 5.0, 5.1, 4.9)]
    assert verdicts == [False] * 4  # silent while the window fills, however large the first value
    assert detector.check(torch.tensor(50.0), norm).item()  # far above 5 +- 0.08
    assert detector.check(torch.tensor(float("nan")), norm).item() is False  # the step guard's business
    assert detector.accepted.item() == 4  # neither joined the window
    assert not detector.check(torch.tensor(5.05), norm).item()
    assert detector.check(torch.tensor(5.0), torch.tensor(40.0)).item()  # the gradient norm spikes alone
    assert detector.values[0].tolist() == pytest.approx([5.05, 5.0, 5.1, 4.9])  # the oldest (9.0) replaced


class SpikyModule(PretrainModule):
    """Its loss (and so its gradients) is 50 times larger at the given optimizer steps."""

    def __init__(self, spike_steps: set[int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.spike_steps = spike_steps

    def configure_model(self) -> None:
        super().configure_model()
        plain = self.loss_fn
        self.loss_fn = lambda model, batch, mask=None, z_loss=False: LossTerms(
            plain(model, batch, mask=mask).ce * (50.0 if self.global_step in self.spike_steps else 1.0), None
        )


def train_with_spikes(spike_steps: set[int], prepared: Path, tmp_path: Path, max_steps: int, fused: bool = False):
    data = PretrainData(data_dir=str(prepared), seq_len=16, batch_size=2, num_workers=0, vocab_size=TINY_VOCAB)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module = SpikyModule(
        spike_steps,
        overrides=TINY,
        vocab_size=TINY_VOCAB,
        seq_len=16,
        spike_window=5,
        max_spike_steps=2,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3, fused=fused),
    )
    snapshots = {}

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            snapshots[trainer.global_step] = pl_module.model.embed.weight.detach().clone()

    checkpoint = PretrainCheckpoint(dirpath=tmp_path, save_last="link", every_n_train_steps=3, save_top_k=-1)
    trainer = L.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoint, Snapshot()],
        gradient_clip_val=1.0,
        accelerator="cpu",
        log_every_n_steps=1,
        default_root_dir=tmp_path,
    )
    with pytest.warns(UserWarning, match="loss spikes"):
        trainer.fit(module, DataLoader([batch] * max_steps, batch_size=None))
    return module, trainer, snapshots


@pytest.mark.parametrize("fused", [False, True], ids=["host-check", "fused-on-device"])
def test_spiking_steps_are_skipped_and_counted(prepared: Path, tmp_path: Path, fused: bool) -> None:
    module, trainer, snapshots = train_with_spikes({7, 9}, prepared, tmp_path, max_steps=12, fused=fused)
    assert module.step_guard.skipped == 2 and module.step_guard.stop_message is None
    assert trainer.global_step == 12  # training went on
    assert torch.equal(snapshots[7], snapshots[8]) and torch.equal(snapshots[9], snapshots[10])  # unchanged
    assert not torch.equal(snapshots[8], snapshots[9]) and not torch.equal(snapshots[10], snapshots[11])
    assert trainer.logged_metrics["train/skipped_steps"] == 2


def test_a_streak_of_spikes_stops_with_the_command_that_rolls_back_past_them(prepared: Path, tmp_path: Path) -> None:
    module, trainer, snapshots = train_with_spikes(set(range(8, 100)), prepared, tmp_path, max_steps=30)
    assert trainer.global_step == 11  # steps 8, 9, 10 spiked: more than 2 in a row, so it stopped after step 10
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert torch.equal(saved["state_dict"]["model.embed.weight"], snapshots[8])  # the weights before the spikes
    with pytest.raises(TrainingDiverged) as stopped:
        module.step_guard.raise_if_stopped(trainer)
    message = str(stopped.value)
    assert "3 steps in a row (steps 8 to 10)" in message
    # Back to the checkpoint of step 6 (the newest before step 8), skipping the batches of steps 6 to 10.
    command = re.search(r"pretrain fit .*", message).group(0)
    earlier = tmp_path / "epoch=0-step=6.ckpt"
    config = tmp_path / "config.yaml"  # the run's saved config: with a logger, in its run folder
    assert command == f"pretrain fit --config {config} --ckpt_path {earlier} --data.skip_batches 5"


def test_skip_batches_resumes_at_the_batches_past_the_skipped_ones(
    corpus, prepared: Path, tmp_path: Path, run_cli, monkeypatch
) -> None:
    recorded = {}
    for name, extra in (
        ("whole", ("--trainer.max_steps", "12")),
        ("first", ("--trainer.max_steps", "4")),
        ("rolled-back", ("--trainer.max_steps", "8", "--data.skip_batches", "2")),
        ("continued", ("--trainer.max_steps", "10", "--data.skip_batches", "2")),
    ):
        records = tmp_path / name
        records.mkdir()
        monkeypatch.setenv("RECORD_BATCHES_DIR", str(records))
        logs = tmp_path / ("whole" if name == "whole" else "run")
        resume = {
            "rolled-back": ("--ckpt_path", str(logs / "quickstart" / "version_0" / "checkpoints" / "last.ckpt")),
            "continued": ("--ckpt_path", "last"),
        }.get(name, ())  # the newest run's: the rolled-back one
        record = ("--checkpoint.every_n_train_steps", "4", "--trainer.callbacks+", "tests.helpers.runs.RecordBatches")
        result = run_cli(*tiny_fit_args(corpus[0], prepared, logs, *record, *extra, *resume))
        assert_ok(result)
        recorded[name] = json.loads((records / "rank0.json").read_text())
    assert recorded["first"] == recorded["whole"][:4]
    assert recorded["rolled-back"] == recorded["whole"][6:10]  # batches 4 and 5 drawn and dropped
    assert recorded["continued"] == recorded["whole"][10:12]  # its own checkpoint: not skipped again


def test_a_negative_skip_is_refused() -> None:
    with pytest.raises(UserError, match="skip_batches=-1 must be 0 or more"):
        PretrainData(skip_batches=-1)
