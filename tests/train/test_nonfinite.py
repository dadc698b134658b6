"""Non-finite losses: steps skipped and counted, a run that stays non-finite stopped with its last good state."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger
from torch.utils.data import DataLoader

from pretrain.checkpointing.callback import PretrainCheckpoint
from pretrain.data import PretrainData
from pretrain.train.module import PretrainModule
from tests.helpers.runs import TINY_VOCAB, assert_clean_failure, tiny_fit_args

TINY = {"d_model": 32, "n_layer": 1, "n_head": 2, "n_kv_head": 2, "ffn_dim": 64}


class NaNLossModule(PretrainModule):
    """Returns a NaN loss at the given optimizer steps."""

    def __init__(self, nan_steps: set[int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.nan_steps = nan_steps

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step in self.nan_steps else loss


def train_with_nans(
    nan_steps: set[int],
    prepared: Path,
    tmp_path: Path,
    max_steps: int = 10,
    fused: bool = False,
    log_every: int = 50,
    logger: bool | Logger = False,
):
    data = PretrainData(data_dir=str(prepared), seq_len=16, batch_size=2, num_workers=0, vocab_size=TINY_VOCAB)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module = NaNLossModule(
        nan_steps,
        overrides=TINY,
        vocab_size=TINY_VOCAB,
        seq_len=16,
        max_nonfinite_steps=2,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3, fused=fused),
    )
    snapshots = {}

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            snapshots[trainer.global_step] = pl_module.model.embed.weight.detach().clone()

    checkpoint = PretrainCheckpoint(dirpath=tmp_path, save_last="link", every_n_train_steps=0)
    trainer = L.Trainer(
        max_steps=max_steps,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoint, Snapshot()],
        gradient_clip_val=1.0,
        accelerator="cpu",
        log_every_n_steps=log_every,
    )
    with pytest.warns(UserWarning, match="Non-finite loss or gradients"):
        trainer.fit(module, DataLoader([batch] * max_steps, batch_size=None))
    return module, trainer, snapshots, module.step_guard.stop_message


@pytest.mark.parametrize("fused", [False, True], ids=["host-check", "fused-on-device"])
def test_nonfinite_steps_are_skipped_and_counted(prepared: Path, tmp_path: Path, fused: bool) -> None:
    module, trainer, snapshots, stopped = train_with_nans({3, 4}, prepared, tmp_path, fused=fused)
    assert module.step_guard.skipped == 2 and stopped is None
    assert trainer.global_step == 10  # training went on
    assert torch.equal(snapshots[3], snapshots[5])  # the two bad steps changed nothing
    assert not torch.equal(snapshots[5], snapshots[6])
    assert torch.isfinite(module.model.embed.weight).all()


def test_persistent_nonfinite_loss_stops_with_the_last_good_state(prepared: Path, tmp_path: Path) -> None:
    _, trainer, snapshots, stopped = train_with_nans(set(range(4, 100)), prepared, tmp_path)
    assert stopped and "non-finite for 3 steps in a row" in stopped
    assert trainer.global_step == 7  # steps 4, 5, 6 skipped, then stopped
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]["model.embed.weight"]
    assert torch.equal(saved, snapshots[4])  # the weights after the last good step


def test_fused_optimizers_skip_on_the_device_and_stop_at_the_next_read(prepared: Path, tmp_path: Path) -> None:
    """Steps 4.. are bad; the counts are read on the logging steps, 4 (1 in a row) and 9 (6 in a row: stop)."""
    logger = CSVLogger(tmp_path / "logs")
    _, trainer, snapshots, stopped = train_with_nans(set(range(4, 100)), prepared, tmp_path, 20, True, 5, logger)
    assert stopped and "non-finite for 6 steps in a row" in stopped
    assert trainer.global_step == 10
    assert all(torch.equal(snapshots[step], snapshots[4]) for step in range(4, 11))  # no bad step changed weights
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert torch.equal(saved["state_dict"]["model.embed.weight"], snapshots[4])
    assert saved["step_guard"] == {"skipped_steps": 6, "streak": 6, "spike_streak": 0}
    assert trainer.logged_metrics["train/skipped_steps"] == 6  # read where the logs are written, so it reaches them


def test_diverging_run_exits_with_a_message(corpus, prepared: Path, tmp_path: Path, run_cli) -> None:
    huge = ("--model.optimizer.init_args.lr", "1e30", "--model.optimizer.init_args.adamw_lr", "1e30")  # Muon, AdamW
    result = run_cli(*tiny_fit_args(corpus[0], prepared, tmp_path, *huge))
    assert result.returncode == 1
    assert_clean_failure(result, "error: The loss or gradients were non-finite for 6 steps in a row")
    assert (tmp_path / "quickstart" / "version_0" / "checkpoints" / "last.ckpt").exists()
