"""The LightningModule's own behaviour: its validation loss and how it compiles the model."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.utils.data import DataLoader

from pretrain.errors import UserError
from pretrain.model.config import LlamaConfig
from pretrain.model.losses import next_token_loss
from pretrain.train.metrics import HeldOutLoss
from pretrain.train.module import PretrainModule
from pretrain.train.parallel import build_sharded_model
from tests.helpers.runs import TINY_VOCAB

TINY = {"d_model": 32, "n_layer": 1, "n_head": 2, "n_kv_head": 2, "ffn_dim": 64}


def test_the_mean_weighs_each_batch_by_its_size() -> None:
    metric = HeldOutLoss()
    metric.update(torch.tensor(2.0), 3)
    metric.update(torch.tensor(4.0), 1)
    assert metric.compute().item() == pytest.approx((2.0 * 3 + 4.0 * 1) / 4)
    metric.reset()
    metric.update(torch.tensor(5.0), 2)
    assert metric.compute().item() == pytest.approx(5.0)  # reset forgets the earlier batches


def test_a_nan_loss_gives_a_nan_mean_instead_of_an_error() -> None:
    metric = HeldOutLoss()
    metric.update(torch.tensor(1.0), 2)
    metric.update(torch.tensor(float("nan")), 2)
    assert math.isnan(metric.compute().item())


def test_validation_logs_the_mean_loss_over_batches_of_different_sizes() -> None:
    torch.manual_seed(0)
    batches = [torch.randint(0, TINY_VOCAB, (size, 17)) for size in (3, 1, 2)]
    module = PretrainModule(overrides=TINY, vocab_size=TINY_VOCAB, seq_len=16)
    module.configure_model()
    module.eval()
    with torch.no_grad():
        per_sequence = [
            module.loss_fn(module.model, batch[i : i + 1]).ce for batch in batches for i in range(batch.size(0))
        ]
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (logged,) = trainer.validate(module, DataLoader(batches, batch_size=None))
    assert logged["val/loss"] == pytest.approx(torch.stack(per_sequence).mean().item(), rel=1e-5)


def test_bits_per_byte_leave_out_end_of_text_and_beginning_targets_and_count_the_bytes_of_the_rest() -> None:
    """Each target's loss in bits over the bytes it stands for; end-of-text targets (id 0 here) and those of no
    bytes (a beginning token put before each document, id 1 here) count neither."""

    class Data(L.LightningDataModule):
        def token_byte_table(self) -> tuple[list[int], int]:
            return [0, 0, *(1 + i % 3 for i in range(2, TINY_VOCAB))], 0

        def val_dataloader(self) -> DataLoader:
            return DataLoader(batches, batch_size=None)

    torch.manual_seed(1)
    batches = [torch.randint(0, TINY_VOCAB, (size, 17)) for size in (3, 2)]
    batches[0][:, 5] = 0  # end-of-text targets
    batches[0][:, 6] = batches[1][:, 9] = 1  # beginning targets
    module = PretrainModule(overrides=TINY, vocab_size=TINY_VOCAB, seq_len=16)
    module.configure_model()
    module.eval()
    table = torch.tensor(Data().token_byte_table()[0])
    nats, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = module.model(batch[:, :-1])
            losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
            text = batch[:, 1:].flatten() > 1
            nats += losses[text].sum().item()
            count += table[batch[:, 1:].flatten()[text]].sum().item()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (logged,) = trainer.validate(module, datamodule=Data())
    assert logged["val/bpb"] == pytest.approx(nats / math.log(2) / count, rel=1e-5)


def test_the_compile_mode_reaches_torch_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    modes = []

    def recording_compile(fn, mode=None, **kwargs):
        modes.append(mode)
        return fn

    monkeypatch.setattr(torch, "compile", recording_compile)
    no_compiler_missing = lambda device: None  # noqa: E731  (whatever this machine has)
    monkeypatch.setattr("pretrain.train.compile_check.missing_compiler", no_compiler_missing)
    module = PretrainModule(
        overrides=TINY, vocab_size=TINY_VOCAB, seq_len=16, compile=True, compile_mode="max-autotune-no-cudagraphs"
    )
    module.configure_model()
    assert modes == ["max-autotune-no-cudagraphs"]  # the training loss; held-out scoring is compiled on GPUs only
    assert module.held_out_loss_fn is next_token_loss


def test_fsdp2_compiles_each_block_in_the_compile_mode(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    modes = []

    def recording_compile(fn, mode=None, **kwargs):
        modes.append(mode)
        return fn

    monkeypatch.setattr(torch, "compile", recording_compile)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        config = LlamaConfig(vocab_size=64, seq_len=8, d_model=16, n_layer=2, n_head=2, n_kv_head=2, ffn_dim=32)
        build_sharded_model(
            config,
            init_device_mesh("cpu", (1,)),
            torch.device("cpu"),
            seed=0,
            compile_mode="max-autotune-no-cudagraphs",
        )
    finally:
        dist.destroy_process_group()
    assert modes == ["max-autotune-no-cudagraphs"] * 2  # one per block


def test_a_compile_mode_without_compile_is_refused() -> None:
    with pytest.raises(UserError, match=r"max-autotune-no-cudagraphs has no effect without model\.compile: true"):
        PretrainModule(overrides=TINY, vocab_size=TINY_VOCAB, compile_mode="max-autotune-no-cudagraphs")
