"""The command line, in this process: configs, the `pretrain` command, a run's logs and checkpoints, clear errors."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.strategies import FSDPStrategy
from torch.utils.data import DataLoader

from pretrain.callbacks.progress_bar import LossProgressBar
from pretrain.commands.cli import (
    TOOLS,
    TRAINING,
    WORKER_DIED,
    DataOnlyCLI,
    PretrainCLI,
    main,
    warn_if_restarts_share_the_store,
)
from pretrain.data import PretrainData
from pretrain.train.module import PretrainModule
from pretrain.train.parallel import FSDP2Strategy
from tests.helpers.resume import TRAINED_STEPS
from tests.helpers.runs import (
    QUICKSTART,
    ROOT,
    TINY_VOCAB,
    assert_ok,
    scalars,
    scalars_by_step,
    text_steps,
    tiny_fit_args,
)

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def documented_command(config: Path) -> list[str]:
    """The ``--config`` files of the ``pretrain fit`` command in a config's header comment: how it is run,
    shared parts and overlays composed in order."""
    lines = [line.lstrip("# ").rstrip() for line in config.read_text().splitlines()[:6]]
    start = next(i for i, line in enumerate(lines) if line.startswith("pretrain fit"))
    command = lines[start]
    while command.endswith("\\"):  # continued on the next comment line
        start += 1
        command = command[:-1] + lines[start]
    words = command.split()
    files = [words[i + 1] for i, word in enumerate(words[:-1]) if word == "--config"]
    assert config.name in {Path(f).name for f in files}, f"{config.name}'s header does not show how to run it"
    return [arg for f in files for arg in ("--config", str(ROOT / f))]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses_as_its_header_says_to_run_it(config: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *documented_command(config), "--print_config"])
    assert exit_info.value.code in (None, 0)
    assert "model:" in capsys.readouterr().out


def configured(config: Path) -> Namespace:
    """Everything a config (composed as its header says) configures, instantiated as ``fit`` would, but the
    trainer itself (it needs the GPUs the config asks for)."""
    cli = DataOnlyCLI(PretrainModule, PretrainData, args=documented_command(config), run=False)
    return cli.parser.instantiate_classes(cli.config)


def test_the_fsdp_configs_choose_their_strategy_and_keep_reductions_in_fp32() -> None:
    """Lightning's bf16-mixed alone would make FSDP1 reduce gradients and hold the rotary table in bf16."""
    fsdp = configured(ROOT / "configs" / "fsdp.yaml")
    assert isinstance(fsdp.trainer.strategy, FSDPStrategy)
    policy = fsdp.trainer.strategy.mixed_precision
    assert (policy.param_dtype, policy.reduce_dtype, policy.buffer_dtype) == (
        torch.bfloat16,
        torch.float32,
        torch.float32,
    )
    fsdp2 = configured(ROOT / "configs" / "fsdp2.yaml")
    assert isinstance(fsdp2.trainer.strategy, FSDP2Strategy)
    assert fsdp2.model.hparams.preset == "llama-1b" and fsdp2.trainer.precision == "bf16-mixed"
    optimizer = fsdp2.model.optimizer_factory(torch.nn.Linear(2, 2).parameters())  # injected: a callable
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["lr"] == 0.0004 and optimizer.defaults["fused"]  # gpu.yaml's, llama-1b.yaml's LR


def test_the_pretrain_command_lists_its_subcommands(capsys) -> None:
    main(["--help"])
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in [*TRAINING, *TOOLS])
    for mistake in (["fitt"], []):
        with pytest.raises(SystemExit) as exit_info:
            main(mistake)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "usage: pretrain" in err
        assert [line for line in err.splitlines() if line.startswith("error: ")] == [
            f"error: {'unknown command ' + repr(mistake[0]) if mistake else 'a command is missing'}; choose one of "
            "fit, validate, test, prepare, generate, export, benchmark, compare."
        ]


def test_a_run_learns_validates_at_its_last_step_and_writes_logs_and_checkpoints(trained: Path) -> None:
    losses = scalars(trained, "train/loss")
    assert len(losses) == TRAINED_STEPS
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0]
    # After steps 20 and 40, and after the last step although 50 is not a multiple of the interval (Lightning
    # writes validation metrics at the index of the batch that ran last).
    assert list(scalars_by_step(trained, "val/loss")) == list(scalars_by_step(trained, "val/ppl")) == [19, 39, 49]
    bpb = scalars_by_step(trained, "val/bpb")  # bits per byte: below 8 (a byte) once anything is learnt
    assert list(bpb) == [19, 39, 49] and 0 < bpb[49] < bpb[19] < 8
    assert text_steps(trained) == [20, 40, 50]  # text samples ran with each validation
    assert scalars(trained, "train/lr") and scalars(trained, "train/grad_norm")
    checkpoints = {p.name for p in (trained / "checkpoints").iterdir()}
    assert {f"step={TRAINED_STEPS:07d}.ckpt", "last.ckpt"} <= checkpoints
    assert (trained / "config.yaml").is_file()
    state = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == TRAINED_STEPS
    assert state["state_dict"]["model.embed.weight"].shape == (TINY_VOCAB, 64)


def test_a_deterministic_run_does_not_fill_new_tensors(
    corpus, prepared: Path, tmp_path: Path, run_cli, monkeypatch
) -> None:
    """Deterministic algorithms, without PyTorch's NaN fill of each new tensor (7-10% of a 2-core step); that
    runs still repeat themselves bit for bit: tests/e2e/test_compiled_resume.py."""
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", True)  # restored afterwards
    try:
        result = run_cli(
            *tiny_fit_args(corpus[0], prepared, tmp_path, "--trainer.deterministic", "true", "--trainer.max_steps", "1")
        )
        assert_ok(result)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.utils.deterministic.fill_uninitialized_memory
    finally:
        torch.use_deterministic_algorithms(False)


def test_the_progress_bar_shows_four_significant_digits(monkeypatch) -> None:
    """As TensorBoard's figures read: Lightning's bar alone would show val/bpb 1.6833 as 1.680."""
    shown = {"val/bpb": 1.6833, "val/ppl": 76.596, "val/loss": 4.9, "v_num": 0}
    monkeypatch.setattr(TQDMProgressBar, "get_metrics", lambda self, trainer, module: dict(shown))
    expected = {"val/bpb": "1.683", "val/ppl": "76.60", "val/loss": "4.900", "v_num": 0}
    assert LossProgressBar().get_metrics(None, None) == expected


def test_a_smoke_run_shorter_than_the_warmup_fits_the_schedule(corpus, prepared: Path, run_cli) -> None:
    result = run_cli(*tiny_fit_args(corpus[0], prepared, Path("logs"), "--trainer.max_steps", "3"))
    assert_ok(result)
    assert "warmup_steps=20 is longer than max_steps=3: warming up for 0 steps" in result.stderr
    assert len(scalars(Path("logs") / "quickstart" / "version_0", "val/loss")) == 1  # the last step's


def test_user_mistake_exits_with_one_clear_line(run_cli) -> None:
    result = run_cli("fit", "--config", QUICKSTART, "--data.sources", "[no/such/corpus]", "--data.data_dir", "data")
    assert result.returncode == 2
    assert "error: Source 'no/such/corpus' does not exist" in result.stderr


@pytest.mark.parametrize(
    ("extra", "bar"),
    [
        ((), LossProgressBar),
        (("--trainer.enable_progress_bar", "false"), type(None)),
        (("--trainer.callbacks+", "lightning.pytorch.callbacks.TQDMProgressBar"), TQDMProgressBar),
    ],
    ids=["default", "off", "own bar"],
)
def test_the_command_line_adds_its_progress_bar_unless_told_otherwise(tmp_path: Path, extra, bar) -> None:
    args = ["--config", QUICKSTART, "--trainer.logger.init_args.save_dir", str(tmp_path), *extra]
    cli = PretrainCLI(PretrainModule, PretrainData, args=args, run=False, auto_configure_optimizers=False)
    assert type(cli.trainer.progress_bar_callback) is bar


def test_model_mistake_exits_with_one_clear_line(run_cli) -> None:
    result = run_cli("fit", "--config", QUICKSTART, "--model.overrides", "{ffn_hidden: 256}")
    assert result.returncode == 2
    assert "error: model: Unknown model field(s) ['ffn_hidden']" in result.stderr and "ffn_dim" in result.stderr


def test_a_data_dir_that_is_a_file_exits_with_one_clear_line(tmp_path: Path, run_cli) -> None:
    (tmp_path / "notes.txt").write_text("mine\n")
    result = run_cli("fit", "--config", QUICKSTART, "--data.data_dir", "notes.txt")
    assert result.returncode == 2
    assert "error: data.data_dir notes.txt is a file, not a folder" in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine\n"


def test_settings_lightning_refuses_exit_with_one_clear_line(corpus, prepared, tmp_path, run_cli) -> None:
    result = run_cli(*tiny_fit_args(corpus[0], prepared, tmp_path, "--checkpoint.save_top_k", "3"))
    assert result.returncode == 2
    assert "error: ModelCheckpoint(save_top_k=3, monitor=None) is not a valid configuration" in result.stderr
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
    trainer = L.Trainer(
        max_steps=100,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    module.configure_model()
    with torch.no_grad():
        initial = module.loss_fn(module.model, batch).ce.item()
    trainer.fit(module, DataLoader([batch] * 100, batch_size=None))
    with torch.no_grad():
        final = module.loss_fn(module.model, batch).ce.item()
    assert final < 0.05 * initial


@pytest.mark.parametrize(
    ("message", "died"),
    [
        ("DataLoader worker (pid 4469) is killed by signal: Killed. ", True),
        ("DataLoader worker (pid(s) 12, 13) exited unexpectedly", True),
        ("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call last): ...", False),
    ],
    ids=["killed", "exited", "an error inside a worker"],
)
def test_only_a_dead_loader_worker_is_reported_as_one(message: str, died: bool) -> None:
    """An error raised by the data inside a worker keeps its traceback: it is a bug to read, not a lost worker."""
    assert bool(WORKER_DIED.match(message)) is died


@pytest.mark.parametrize(("shared", "warned"), [("True", True), ("False", False)])
def test_restarts_over_a_shared_store_are_warned_about_with_the_fix(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, shared: str, warned: bool
) -> None:
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", shared)  # what torchrun tells its workers
    monkeypatch.setenv("RANK", "0")
    with caplog.at_level(logging.WARNING):
        warn_if_restarts_share_the_store()
    assert ("Start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in caplog.text) is warned


@pytest.mark.parametrize("precision", ["16-mixed", "16"])
def test_fp16_mixed_precision_is_refused_with_the_alternatives(corpus, prepared, tmp_path, run_cli, precision) -> None:
    result = run_cli(*tiny_fit_args(corpus[0], prepared, tmp_path, "--trainer.precision", precision))
    assert result.returncode == 2
    assert "error: trainer.precision: 16-mixed is not supported" in result.stderr and "bf16-mixed" in result.stderr
    assert not (tmp_path / "quickstart").exists()  # refused before anything ran
