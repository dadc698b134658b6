"""A config or checkpoint that does not fit, a checkpoint that would run code, a crash mid-save: each ends in
one clear message and loses nothing."""

from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from pretrain.checkpointing.callback import AtomicCheckpointIO
from pretrain.checkpointing.loading import load_checkpoint
from pretrain.errors import UserError
from tests.helpers.runs import QUICKSTART, assert_clean_failure, assert_ok, tiny_fit_args


def test_unknown_config_key_is_readable(run_cli) -> None:
    result = run_cli("fit", "--config", QUICKSTART, "--model.learning_rate", "1")
    assert_clean_failure(result, "learning_rate")


def test_validate_reads_the_model_the_checkpoint_was_saved_with(
    corpus, prepared: Path, trained: Path, tmp_path: Path, run_cli
) -> None:
    """The checkpoint's module arguments define the model validated, whatever the config says (fit refuses
    another model: tests/checkpointing/test_resume_check.py)."""
    shutil.copytree(trained, tmp_path / "quickstart" / "version_0", symlinks=True)
    other = "{d_model: 32, n_layer: 2, n_head: 2, n_kv_head: 2, ffn_dim: 128}"
    checkpoint = tmp_path / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    args = tiny_fit_args(corpus[0], prepared, tmp_path, "--model.overrides", other, "--ckpt_path", str(checkpoint))
    assert_ok(run_cli("validate", *args[1:]))


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
    _load_state_dict(
        {}, storage_reader=dcp.FileSystemReader(folder), planner=_EmptyStateDictLoadPlanner(), no_dist=True
    )
    assert marker.exists()  # as Lightning reads a folder to resume from: the entry runs


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_commands_refuse_a_sharded_checkpoint_whose_index_would_run_code(
    corpus, prepared: Path, tmp_path: Path, command: str, run_cli
) -> None:
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
