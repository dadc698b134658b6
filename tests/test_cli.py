"""End-to-end tests through the real entry point, ``python main.py ...``, on tiny configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.strategies import FSDPStrategy
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from pretrain.callbacks import LossProgressBar
from pretrain.cli import PretrainCLI, main
from pretrain.data import PretrainData
from pretrain.module import PretrainModule
from tests.conftest import TINY_VOCAB

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = "{d_model: 64, n_layer: 2, n_head: 2, n_kv_head: 2, ffn_dim: 128}"


def run_main(*args: str, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tiny_fit_args(corpus_root: Path, data_dir: Path, logs: Path, *extra: str) -> list[str]:
    """The quickstart config shrunk to seconds, on the shared test corpus."""
    return [
        "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
        "--data.sources", f"[{corpus_root}]", "--data.data_dir", str(data_dir),
        "--data.vocab_size", str(TINY_VOCAB), "--data.val_fraction", "0.1",
        "--data.seq_len", "64", "--data.num_workers", "0",
        "--model.overrides", TINY_MODEL,
        "--trainer.max_steps", "40", "--trainer.val_check_interval", "20", "--trainer.limit_val_batches", "2",
        "--trainer.log_every_n_steps", "1", "--trainer.logger.init_args.save_dir", str(logs),
        "--trainer.enable_progress_bar", "false", "--checkpoint.every_n_train_steps", "20",
        *extra,
    ]  # fmt: skip


def scalars(run_dir: Path, tag: str) -> list[float]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [event.value for event in events.Scalars(tag)]


def scalars_by_step(run_dir: Path, tag: str) -> dict[int, float]:
    """{step: value}; where a resumed run logged a step again, its value wins."""
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_parses(config: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (None, 0)
    assert "model:" in capsys.readouterr().out


def test_the_fsdp_config_sums_gradients_and_keeps_buffers_in_fp32() -> None:
    """Lightning's bf16-mixed alone would make FSDP1 reduce gradients and hold the rotary table in bf16."""
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=FSDPStrategy)
    raw = yaml.safe_load((ROOT / "configs" / "llama-1b-fsdp.yaml").read_text())["trainer"]["strategy"]
    policy = parser.instantiate(parser.parse_object({"strategy": raw})).strategy.mixed_precision
    assert (policy.param_dtype, policy.reduce_dtype, policy.buffer_dtype) == (torch.bfloat16, torch.float32,
                                                                              torch.float32)  # fmt: skip


def test_the_learning_rate_is_logged_on_the_steps_the_trainer_writes(corpus, prepared: Path, tmp_path: Path) -> None:
    """Logged as a Python number it costs a host-to-GPU copy that waits for the GPU: only where written."""
    short = ("--trainer.max_steps", "12", "--trainer.log_every_n_steps", "4", "--trainer.val_check_interval", "12",
             "--model.lr_scheduler.init_args.warmup_steps", "2")  # fmt: skip
    result = run_main(*tiny_fit_args(corpus[0], prepared, tmp_path, *short))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "quickstart" / "version_0"
    written = sorted(scalars_by_step(run_dir, "train/loss"))
    assert written == [3, 7, 11]
    assert sorted(scalars_by_step(run_dir, "train/lr")) == written


def test_fit_through_the_cli_learns_and_writes_logs_and_checkpoints(corpus, prepared: Path, tmp_path: Path) -> None:
    result = run_main(*tiny_fit_args(corpus[0], prepared, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "quickstart" / "version_0"
    losses = scalars(run_dir, "train/loss")
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0]
    assert len(scalars(run_dir, "val/loss")) == 2 and scalars(run_dir, "val/ppl")
    assert scalars(run_dir, "train/lr") and scalars(run_dir, "train/grad_norm")
    checkpoints = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert {"step=0000040.ckpt", "last.ckpt"} <= checkpoints
    assert (run_dir / "config.yaml").is_file()
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 40
    assert state["state_dict"]["model.embed.weight"].shape == (TINY_VOCAB, 64)


def test_user_mistake_exits_with_one_clear_line(tmp_path: Path) -> None:
    result = run_main("fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
                      "--data.sources", "[no/such/corpus]", "--data.data_dir", str(tmp_path / "data"),
                      "--trainer.logger.init_args.save_dir", str(tmp_path), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2
    assert "error: Source 'no/such/corpus' does not exist" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("extra", "bar"),
    [((), LossProgressBar), (("--trainer.enable_progress_bar", "false"), type(None)),
     (("--trainer.callbacks+", "lightning.pytorch.callbacks.TQDMProgressBar"), TQDMProgressBar)],
    ids=["default", "off", "own bar"],
)  # fmt: skip
def test_the_command_line_adds_its_progress_bar_unless_told_otherwise(tmp_path: Path, extra, bar) -> None:
    args = ["--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.logger.init_args.save_dir", str(tmp_path),
            *extra]  # fmt: skip
    cli = PretrainCLI(PretrainModule, PretrainData, args=args, run=False, auto_configure_optimizers=False)
    assert type(cli.trainer.progress_bar_callback) is bar


def test_model_mistake_exits_with_one_clear_line(tmp_path: Path) -> None:
    result = run_main("fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
                      "--model.overrides", "{ffn_hidden: 256}", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2
    assert "error: model: Unknown model field(s) ['ffn_hidden']" in result.stderr and "ffn_dim" in result.stderr
    assert "Traceback" not in result.stderr


def test_model_overfits_one_batch(prepared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # the initial weights, whatever seed earlier tests left behind
    data = PretrainData(data_dir=str(prepared), seq_len=32, batch_size=4, num_workers=0, vocab_size=TINY_VOCAB)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module = PretrainModule(
        overrides={"d_model": 64, "n_layer": 2, "n_head": 2, "n_kv_head": 2, "ffn_dim": 128},
        vocab_size=TINY_VOCAB,
        seq_len=32,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
    )
    trainer = L.Trainer(max_steps=100, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")  # fmt: skip
    module.configure_model()
    with torch.no_grad():
        initial = module._loss(batch).item()
    trainer.fit(module, DataLoader([batch] * 100, batch_size=None))
    with torch.no_grad():
        final = module._loss(batch).item()
    assert final < 0.05 * initial


@pytest.mark.slow
def test_quickstart_meets_its_promise(tmp_path: Path) -> None:
    """The README's quickstart, verbatim: the last val/loss ends below 0.6 x the first train/loss."""
    result = run_main("fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "logs" / "quickstart" / "version_0"
    assert scalars(run_dir, "val/loss")[-1] < 0.6 * scalars(run_dir, "train/loss")[0]
