import json
import warnings
from types import SimpleNamespace

import pytest
import torch

from pretrain.callbacks import throughput
from pretrain.callbacks.throughput import flops_per_token
from pretrain.commands import benchmark
from pretrain.commands.benchmark import main as benchmark_main
from pretrain.data.prepare.manifest import read_manifest
from pretrain.errors import UserError
from pretrain.model.config import PRESETS
from tests.helpers.runs import ROOT, TINY_VOCAB, assert_ok, scalars, scalars_by_step, scalars_tags, tiny_fit_args


def test_flops_per_token_follows_the_palm_formula() -> None:
    config = PRESETS["gpt2-124m"]
    linear = 12 * (768 * 3 * 768 + 768 * 768 + 3 * 768 * 2048) + 768 * config.padded_vocab_size  # LM head included
    assert flops_per_token(config) == 6 * linear + 12 * 12 * 768 * 1024
    config = PRESETS["llama-1b"]  # grouped-query attention: 4 key/value heads of 64
    linear = 22 * (2048 * (2048 + 2 * 256) + 2048 * 2048 + 3 * 2048 * 5632) + 2048 * 32000
    assert flops_per_token(config) == 6 * linear + 12 * 22 * 2048 * 2048


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
    ],
)
def test_the_peak_follows_the_card(monkeypatch: pytest.MonkeyPatch, name: str, peak: float) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: name)
    assert throughput.peak_flops(torch.device("cuda", 0)) == peak


def test_throughput_is_logged_during_training(trained) -> None:
    speeds = scalars_by_step(trained, "perf/tokens_per_sec")  # the quickstart logs it every 25 steps
    assert list(speeds) == [25, 50] and all(speed > 0 for speed in speeds.values())
    assert not (set(scalars_tags(trained)) & {"perf/mfu"})  # a CPU has no known peak


def test_throughput_is_logged_once_per_interval_with_gradient_accumulation(corpus, prepared, tmp_path, run_cli) -> None:
    accumulate = ("--trainer.accumulate_grad_batches", "2", "--trainer.max_steps", "26")
    result = run_cli(*tiny_fit_args(corpus[0], prepared, tmp_path, *accumulate))
    assert_ok(result)
    run_dir = tmp_path / "quickstart" / "version_0"
    assert len(scalars(run_dir, "perf/tokens_per_sec")) == 1  # step 25, once, though two batches end on it
    assert len(scalars(run_dir, "train/loss")) == 26  # one per optimizer step


def clocked_run(monkeypatch: pytest.MonkeyPatch, tag: str, interval: int, peak: float):
    """A Throughput callback under a clock the test moves, and a trainer whose one logger keeps ``tag`` by step."""
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: clock.now)
    logged = {}
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.update({step: metrics[tag]}))
    trainer = SimpleNamespace(
        global_step=0, world_size=1, loggers=[logger], fit_loop=SimpleNamespace(_should_accumulate=lambda: False)
    )  # no accumulation
    return clock, logged, throughput.Throughput(interval=interval, peak_flops=peak), trainer


def test_validation_and_checkpoint_saves_are_left_out_of_the_throughput(monkeypatch: pytest.MonkeyPatch) -> None:
    clock, logged, callback, trainer = clocked_run(monkeypatch, "perf/tokens_per_sec", interval=4, peak=1.0)
    module = SimpleNamespace(
        config=PRESETS["tiny"], device=torch.device("cpu"), hparams=SimpleNamespace(attention_mask="causal")
    )
    callback.on_train_start(trainer, module)
    batch = torch.zeros(2, 11)  # 20 tokens per step
    for step in range(12):
        callback.on_train_batch_start(trainer, module, batch, step)
        clock.now += 1.0  # a training step
        trainer.global_step = step + 1
        callback.on_train_batch_end(trainer, module, None, batch, step)
        if trainer.global_step == 5:
            callback.on_validation_start(trainer, module)
            clock.now += 100.0
        if trainer.global_step == 9:
            callback.on_save_checkpoint(trainer, module, {})
            clock.now += 50.0
    assert logged == {4: 20.0, 8: 20.0, 12: 20.0}  # 20 tokens a second throughout


def test_mfu_under_document_masking_counts_the_attention_the_mask_leaves(monkeypatch: pytest.MonkeyPatch) -> None:
    clock, logged, callback, trainer = clocked_run(monkeypatch, "perf/mfu", interval=2, peak=1e9)
    hparams = SimpleNamespace(attention_mask="document")
    module = SimpleNamespace(config=PRESETS["tiny"], device=torch.device("cpu"), hparams=hparams, eos_id=0)
    callback.on_train_start(trainer, module)
    one_document = torch.ones(1, 9, dtype=torch.long)  # 8 inputs: 36 pairs, as causal
    two_documents = torch.tensor([[1, 1, 1, 0, 1, 1, 1, 1, 1]])  # 4 + 4 inputs: 10 + 10 pairs, 20 / 36
    for step, batch in enumerate([one_document, one_document, two_documents, one_document]):  # the first: warm-up
        clock.now += 1.0
        trainer.global_step = step + 1
        callback.on_train_batch_end(trainer, module, None, batch, step)
    per_token = throughput.flops_per_token
    assert logged == {  # 8 tokens a second
        2: pytest.approx(8 * per_token(PRESETS["tiny"]) / 1e9),
        4: pytest.approx(8 * per_token(PRESETS["tiny"], (20 / 36 + 1) / 2) / 1e9),  # the interval's two batches
    }


def test_benchmark_prints_a_table_then_json(corpus, prepared, capsys: pytest.CaptureFixture) -> None:
    overrides = tiny_fit_args(corpus[0], prepared, prepared.parent / "bench-logs")[3:]  # drop "fit --config X"
    benchmark_main(
        [
            "train",
            "--config",
            str(ROOT / "configs" / "quickstart.yaml"),
            "--warmup",
            "2",
            "--steps",
            "6",
            *overrides,
            "--data.vocab_size",
            str(TINY_VOCAB),
        ]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert any("bare loop" in line for line in lines)
    result = json.loads(lines[-1])
    assert result["project_tokens_per_sec"] > 0 and result["bare_tokens_per_sec"] > 0
    assert result["ratio"] == pytest.approx(result["project_tokens_per_sec"] / result["bare_tokens_per_sec"], rel=1e-3)
    assert result["mfu"] is None and result["peak_mem_gib"] > 0


@pytest.mark.parametrize("option", [("--trainer.accumulate_grad_batches", "2"), ("--trainer.devices", "2")])
def test_the_benchmark_refuses_what_its_bare_loop_cannot_mirror(corpus, prepared, option) -> None:
    overrides = tiny_fit_args(corpus[0], prepared, prepared.parent / "bench-logs")[3:]
    with pytest.raises(UserError, match="one micro-batch per step on one device"):
        benchmark.train([str(ROOT / "configs" / "quickstart.yaml")], 1, 1, [*overrides, *option])


def test_data_benchmark_reports_preparation_against_the_tokenizer(corpus, tmp_path, capsys) -> None:
    overrides = ["--data.sources", f"[{corpus[0]}]", "--data.data_dir", str(tmp_path), "--data.vocab_size", "320"]
    config = str(ROOT / "configs" / "quickstart.yaml")
    loader = ["--batch_size", "4", "--seq_len", "16", "--batches", "20", "--data.num_workers", "0"]
    benchmark_main(["data", "--config", config, *loader, *overrides])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["tokens"] == sum(split["tokens"] for split in read_manifest(tmp_path)["splits"].values())
    assert result["prepare_ratio"] == pytest.approx(
        result["prepare_tokens_per_sec"] / result["tokenizer_tokens_per_sec"], abs=1e-3
    )  # the ratio is rounded to 3 decimals
    assert result["loader_tokens_per_sec"] > 0


def test_the_benchmark_names_the_steps_that_waited_for_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA's sync debug mode warns at each wait; here the warnings are raised by hand (no GPU)."""
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)
    monkeypatch.setattr(benchmark, "_synchronize", lambda device: None)
    timer = benchmark.StepTimer(warmup=2, steps=6)
    module, batch = SimpleNamespace(device=torch.device("cuda")), torch.zeros(2, 9)

    def wait() -> None:
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)

    for step in range(1, 9):
        timer.on_train_batch_start(SimpleNamespace(global_step=step - 1), batch, step - 1)
        if step in (1, 4, 7):
            wait()  # during the step
        timer.on_train_batch_end(SimpleNamespace(global_step=step), module, None, batch, step - 1)
        if step in (5, 7):
            wait()  # after the batch: the trainer writing this step's logs
    timer.on_train_batch_start(SimpleNamespace(global_step=8), batch, 8)
    assert timer.sync_steps == [4, 5, 7]  # step 1 is before the timed window; the wait of step 5 is not step 6's
    assert timer._warnings is None  # warnings are reported as usual again


def test_a_benchmark_option_mistake_is_one_error_line(run_cli) -> None:
    result = run_cli("benchmark", "train", "--steps", "many")
    assert result.returncode == 2
    assert [line for line in result.stderr.splitlines() if line.startswith("error: ")] == [
        "error: argument --steps: invalid int value: 'many'; `pretrain benchmark train --help` lists the options."
    ]
