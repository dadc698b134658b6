"""Every user mistake and every fault ends in one clear message, and loses nothing already built."""

from __future__ import annotations

import pickle
import re
import shutil
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.loggers import CSVLogger, Logger
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.utils.data import DataLoader

from pretrain.checkpointing import AtomicCheckpointIO, PretrainCheckpoint
from pretrain.data import PretrainData
from pretrain.data.build import prepare
from pretrain.data.sources import resolve_sources
from pretrain.errors import UserError
from pretrain.loading import load_checkpoint
from pretrain.module import PretrainModule
from tests.conftest import make_corpus
from tests.helpers import QUICKSTART, TINY_VOCAB, Result, tiny_fit_args
from tests.test_data import decoded_documents

TINY = {"d_model": 32, "n_layer": 1, "n_head": 2, "n_kv_head": 2, "ffn_dim": 64}


def assert_clean_failure(result: Result, *fragments: str) -> None:
    """A failed command that said why; in this process, any exception other than the command's exit escapes."""
    assert result.returncode != 0
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr[-3000:]


# --- sources and preparation ---------------------------------------------------------------------


def test_sources_without_text_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_bytes(b"\x00\x01\x02")
    with pytest.raises(UserError, match=r"hold no text \(skipped: \{'empty': 1, 'binary': 1, 'unsupported': 0\}\)"):
        resolve_sources([str(tmp_path)])


def test_binary_files_are_skipped_and_counted(tmp_path: Path) -> None:
    docs = make_corpus(tmp_path / "corpus", n_docs=6)
    (tmp_path / "corpus" / "notes" / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    manifest = prepare([str(tmp_path / "corpus")], str(tmp_path / "data"), vocab_size=TINY_VOCAB)
    assert manifest["skipped_files"] == {"empty": 0, "binary": 1, "unsupported": 0}
    texts = decoded_documents(tmp_path / "data", "train") + decoded_documents(tmp_path / "data", "val")
    assert sum(map(len, texts)) == sum(map(len, docs.values()))  # every document's text (whole or in pieces), no more


def test_invalid_utf8_is_replaced_and_counted(tmp_path: Path) -> None:
    make_corpus(tmp_path / "corpus", n_docs=4)
    (tmp_path / "corpus" / "latin1.txt").write_bytes("café crème brûlée\n".encode("latin-1"))
    manifest = prepare([str(tmp_path / "corpus")], str(tmp_path / "data"), vocab_size=TINY_VOCAB)
    assert manifest["invalid_utf8_documents"] == 1
    texts = decoded_documents(tmp_path / "data", "train") + decoded_documents(tmp_path / "data", "val")
    assert "caf\ufffd cr\ufffdme br\ufffdl\ufffde\n" in texts


def test_truncated_shard_is_named(prepared: Path, tmp_path: Path) -> None:
    copy = tmp_path / "data"
    subprocess.run(["cp", "-r", str(prepared), str(copy)], check=True)
    chunk = next((copy / "train").glob("*.bin"))
    chunk.write_bytes(chunk.read_bytes()[:-100])
    data = PretrainData(data_dir=str(copy), vocab_size=TINY_VOCAB)
    with pytest.raises(UserError, match=rf"Shard {chunk} is truncated or corrupted"):
        data.setup("fit")


def test_corrupted_shard_header_is_named(prepared: Path, tmp_path: Path) -> None:
    copy = tmp_path / "data"
    subprocess.run(["cp", "-r", str(prepared), str(copy)], check=True)
    chunk = next((copy / "val").glob("*.bin"))
    raw = bytearray(chunk.read_bytes())
    raw[0:4] = (12345).to_bytes(4, "little")
    chunk.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=rf"Shard {chunk} is corrupted"):
        PretrainData(data_dir=str(copy), vocab_size=TINY_VOCAB).setup("fit")


# --- configuration and checkpoints ---------------------------------------------------------------


def test_unknown_config_key_is_readable(run_cli) -> None:
    result = run_cli("fit", "--config", QUICKSTART, "--model.learning_rate", "1")
    assert_clean_failure(result, "learning_rate")


def test_checkpoint_that_does_not_fit_the_config_is_refused(corpus, prepared: Path, trained: Path, tmp_path: Path,
                                                             run_cli) -> None:  # fmt: skip
    shutil.copytree(trained, tmp_path / "quickstart" / "version_0", symlinks=True)  # a run to continue
    other = "{d_model: 32, n_layer: 2, n_head: 2, n_kv_head: 2, ffn_dim: 128}"
    result = run_cli(*tiny_fit_args(corpus[0], prepared, tmp_path, "--model.overrides", other, "--ckpt_path", "last"))
    assert_clean_failure(
        result, "does not fit the configured model", "model.embed.weight: (320, 64) vs config (320, 32)"
    )


def test_checkpoint_that_would_run_code_is_refused(corpus, prepared: Path, tmp_path: Path, run_cli) -> None:
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": pickle.loads(pickle.dumps(Path("x")))}, evil)
    result = run_cli(*tiny_fit_args(corpus[0], prepared, tmp_path, "--ckpt_path", str(evil)))
    assert_clean_failure(result, f"{evil} holds objects other than tensors")


class WritesAFile:
    """Unpickling this writes a file: it stands for any code a pickled index could run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return Path.write_text, (self.path, "ran")


def call_through_a_dotted_name(module: str, name: str, args: tuple) -> bytes:
    """A pickle that calls what ``name`` reaches from ``module`` attribute by attribute (protocol 4 allows
    dots), e.g. a function of a module that ``module`` imported."""

    def text(value: str) -> bytes:
        return b"\x8c" + bytes([len(value)]) + value.encode()  # SHORT_BINUNICODE

    return b"\x80\x04" + text(module) + text(name) + b"\x93" + pickle.dumps(args, protocol=2)[2:-1] + b"R."


def evil_indexes(marker: Path) -> dict[str, bytes]:
    """Indexes (.metadata) that run code, or change the process, when unpickled without restriction."""
    import torch.utils.collect_env  # noqa: F401  (makes the dotted path below reach subprocess.run)

    def text(value: str) -> bytes:
        return b"X" + len(value).to_bytes(4, "little") + value.encode()  # BINUNICODE

    return {
        "pathlib.Path.write_text": pickle.dumps(WritesAFile(marker)),
        "torch.distributed.checkpoint.metadata.torch.utils.collect_env.subprocess.run": call_through_a_dotted_name(
            "torch.distributed.checkpoint.metadata", "torch.utils.collect_env.subprocess.run", (["touch", marker],)
        ),
        # pathlib.PurePath.__truediv__ = PosixPath: every `folder / name` would lose its folder
        "state set on <class 'pathlib.PurePath'>": b"\x80\x02cpathlib\nPurePath\nN}"
        + text("__truediv__")
        + b"cpathlib\nPosixPath\ns\x86b.",
        "a 'int' object instead of an index": pickle.dumps(0),  # PyTorch then unpickles __0.metadata instead
    }


def test_sharded_checkpoint_whose_index_would_run_code_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "step=0000010.ckpt"
    dcp.save({"model": {"w": torch.ones(2)}, "optimizer_0": {"m": torch.ones(2)}}, checkpoint_id=folder, no_dist=True)
    loaded = load_checkpoint(folder)
    assert list(loaded) == ["state_dict"] and torch.equal(loaded["state_dict"]["w"], torch.ones(2))  # weights only
    marker = tmp_path / "ran"
    for name, index in evil_indexes(marker).items():
        (folder / ".metadata").write_bytes(index)
        with pytest.raises(UserError, match=f"holds {re.escape(name)} in its index"):
            load_checkpoint(folder)  # as generate, export and init_from read a folder
        assert not marker.exists(), name
    assert Path("/ckpt") / "meta.pt" == Path("/ckpt/meta.pt")
    pickle.loads(evil_indexes(marker)["pathlib.Path.write_text"])  # plain unpickling runs them
    assert marker.exists()


def test_sharded_checkpoint_with_an_entry_that_would_run_code_is_refused(tmp_path: Path) -> None:
    """PyTorch's reader loads non-tensor entries with weights_only=False, whatever their key."""
    folder, marker = tmp_path / "step=0000010.ckpt", tmp_path / "ran"
    dcp.save({"model": {"w": torch.ones(2), "note": WritesAFile(marker)}}, checkpoint_id=folder, no_dist=True)
    with pytest.raises(UserError, match=r"holds an entry 'model\.note' that cannot be loaded weights-only"):
        load_checkpoint(folder)
    assert not marker.exists()
    _load_state_dict({}, storage_reader=dcp.FileSystemReader(folder), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)  # fmt: skip
    assert marker.exists()  # as Lightning reads a folder to resume from: the entry runs


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_commands_refuse_a_sharded_checkpoint_whose_index_would_run_code(corpus, prepared: Path, tmp_path: Path,
                                                                         command: str, run_cli) -> None:  # fmt: skip
    folder = tmp_path / "step=0000010.ckpt"
    dcp.save({"model": {"w": torch.ones(2)}}, checkpoint_id=folder, no_dist=True)
    marker = tmp_path / "ran"
    (folder / ".metadata").write_bytes(pickle.dumps(WritesAFile(marker)))
    args = tiny_fit_args(corpus[0], prepared, tmp_path, "--ckpt_path", str(folder))
    result = run_cli(command, *args[1:])
    assert_clean_failure(result, "which is not what a checkpoint holds")
    assert not marker.exists()


def test_crash_mid_save_leaves_the_previous_checkpoint_intact(tmp_path: Path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    target = tmp_path / "step=0000002.ckpt"
    io.save_checkpoint({"global_step": 2, "weights": torch.ones(4)}, target)

    def crash_half_way(obj, file) -> None:
        file.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk vanished")

    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(OSError, match="disk vanished"):
        io.save_checkpoint({"global_step": 4}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step=0000002.ckpt"]  # no torn or temporary file
    assert torch.load(target, weights_only=True)["global_step"] == 2


# --- non-finite losses ---------------------------------------------------------------------------


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
    module = NaNLossModule(nan_steps, overrides=TINY, vocab_size=TINY_VOCAB, seq_len=16, max_nonfinite_steps=2,
                           optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3, fused=fused))  # fmt: skip
    snapshots = {}

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            snapshots[trainer.global_step] = pl_module.model.embed.weight.detach().clone()

    checkpoint = PretrainCheckpoint(dirpath=tmp_path, save_last="link", every_n_train_steps=0)
    trainer = L.Trainer(max_steps=max_steps, logger=logger, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[checkpoint, Snapshot()], gradient_clip_val=1.0, accelerator="cpu",
                        log_every_n_steps=log_every)  # fmt: skip
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
