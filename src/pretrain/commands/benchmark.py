"""Measure speed: ``pretrain benchmark train|data --config configs/quickstart.yaml`` (``--config`` repeatable).

Runs the project's real training step (its LightningModule and DataModule over real shards, the
configured callbacks and progress bar) and a bare PyTorch loop over the same model, optimizer,
precision and batch, in the same process. Prints a table, then one JSON line:
``project_tokens_per_sec``, ``bare_tokens_per_sec``, ``ratio``, ``mfu``, ``peak_mem_gib``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import torch
import yaml

from pretrain.callbacks.throughput import causal_share, flops_per_token, peak_flops
from pretrain.commands import benchmark_data
from pretrain.commands.cli import PretrainCLI
from pretrain.data import PretrainData
from pretrain.errors import CommandParser, UserError, run_command
from pretrain.train.compile_check import compiles
from pretrain.train.module import PretrainModule
from pretrain.train.parallel import build_training_model
from pretrain.train.param_groups import param_groups


class StepTimer(L.Callback):
    """Wall time of optimizer steps ``warmup`` .. ``warmup + steps``, synchronised at both ends.

    On a GPU it also records the steps in which the host waited for the GPU (CUDA's sync debug
    mode warns at each such wait): only the logging steps should. A step is labelled as
    ``trainer.global_step`` after its optimizer step, and owns what the trainer does after its
    batch (writing logs, saving checkpoints), up to the next batch.
    """

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.seconds = 0.0
        self.tokens_per_step = 0
        self.sync_steps: list[int] | None = None  # None where not recorded (CPU)
        self._warnings: warnings.catch_warnings | None = None
        self._caught: list[warnings.WarningMessage] = []
        self._seen = 0

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        self._note_waits(trainer.global_step)  # since the previous batch ended: still the previous step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        self._note_waits(step)
        if step == self.warmup:
            _synchronize(pl_module.device)
            self._start = time.perf_counter()
            self.tokens_per_step = batch.size(0) * (batch.size(1) - 1)
            if pl_module.device.type == "cuda":
                self._record_syncs(True)
        elif step == self.warmup + self.steps:
            self._record_syncs(False)
            _synchronize(pl_module.device)
            self.seconds = time.perf_counter() - self._start

    def _note_waits(self, step: int) -> None:
        if self._warnings is None or len(self._caught) == self._seen:
            return
        waited = any("synchroniz" in str(w.message) for w in self._caught[self._seen :])
        if waited and (not self.sync_steps or self.sync_steps[-1] != step):
            self.sync_steps.append(step)
        self._seen = len(self._caught)

    def _record_syncs(self, on: bool) -> None:
        if on:
            self._warnings, self.sync_steps = warnings.catch_warnings(record=True), []
            self._caught = self._warnings.__enter__()
            warnings.simplefilter("always")  # every wait, not the first per place
            torch.cuda.set_sync_debug_mode("warn")
        elif self._warnings is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._warnings.__exit__(None, None, None)
            self._warnings = None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def project_run(configs: list[str], warmup: int, steps: int, extra: list[str]) -> tuple[PretrainCLI, StepTimer]:
    timer = StepTimer(warmup, steps)
    logs = tempfile.mkdtemp(prefix="benchmark-")
    args = [
        *config_args(configs),
        "--trainer.max_steps",
        str(warmup + steps + 1),
        "--trainer.limit_val_batches",
        "0",
        "--trainer.logger.init_args.save_dir",
        logs,
        *_schedule_length(configs),
        *extra,
    ]
    cli = PretrainCLI(PretrainModule, PretrainData, args=args, run=False, auto_configure_optimizers=False)
    trainer = cli.trainer
    if trainer.accumulate_grad_batches != 1 or trainer.num_devices * trainer.num_nodes != 1:
        raise UserError(
            "The benchmark times one micro-batch per step on one device, as its bare loop does: "
            "add --trainer.accumulate_grad_batches 1 --trainer.devices 1 --trainer.num_nodes 1."
        )
    trainer.callbacks.append(timer)
    if trainer.strategy.root_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, timer


def config_args(configs: list[str]) -> list[str]:
    """``--config A --config B``: composed by the training command line's parser, in order."""
    return [arg for config in configs for arg in ("--config", config)]


def _schedule_length(configs: list[str]) -> list[str]:
    """Keep the LR schedule as long as the configs' training (the last ``trainer.max_steps`` they set), not the
    benchmark's few steps."""
    raw = [yaml.safe_load(Path(config).read_text()) or {} for config in configs]
    lengths = [(part.get("trainer") or {}).get("max_steps") for part in raw]
    scheduled = any((part.get("model") or {}).get("lr_scheduler") for part in raw)
    length = next((steps for steps in reversed(lengths) if steps), None)
    return ["--model.lr_scheduler.init_args.max_steps", str(length)] if scheduled and length else []


def bare_loop(cli: PretrainCLI, batch: torch.Tensor, warmup: int, steps: int) -> float:
    """Seconds for ``steps`` steps of a hand-written loop: (attention mask,) forward, loss, backward, clip, step."""
    module, trainer = cli.model, cli.trainer
    device = trainer.strategy.root_device
    compile_mode = module.hparams.compile_mode if compiles(module.hparams.compile, device) else None
    model, loss_fn = build_training_model(module.config, 0, device, compile_mode=compile_mode)  # as the module does
    model.activation_checkpointing = module.hparams.activation_checkpointing
    model.use_attention_kernel(module.hparams.attention_kernel)
    optimizer = module.optimizer_factory(param_groups(model))
    bf16 = str(trainer.precision).startswith("bf16")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    batch = batch.to(device)
    clip = trainer.gradient_clip_val
    for step in range(warmup + steps):
        if step == warmup:
            _synchronize(device)
            start = time.perf_counter()
        with autocast:
            mask = module.attention_mask_of(batch)  # built each step, as the module does
            loss = loss_fn(model, batch, mask=mask).ce
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _synchronize(device)
    return time.perf_counter() - start


def train(
    configs: list[str], warmup: int = 5, steps: int = 100, args: list[str] | None = None, bare: bool = True
) -> dict:
    """Benchmark the training step of ``configs`` (composed in order) against a bare loop.

    Args:
        configs: Training configs, e.g. [configs/gpu.yaml, configs/gpt2-124m.yaml].
        warmup: Steps run before timing starts (compilation, allocator warm-up).
        steps: Steps timed.
        args: Extra CLI overrides, e.g. ["--data.batch_size", "16"].
        bare: Also time the bare loop (skip it to compare variants of the project's step quickly).
    """
    cli, timer = project_run(configs, warmup, steps, args or [])
    device = cli.trainer.strategy.root_device
    project_peak = _peak_memory_gib(device)
    tokens = timer.tokens_per_step * steps
    project = tokens / timer.seconds
    bare_speed = None
    masked = cli.model.hparams.attention_mask == "document"  # MFU counts the attention the mask leaves, as logged
    batch = next(iter(cli.datamodule.train_dataloader())) if bare or masked else None
    if bare:
        bare_speed = tokens / bare_loop(cli, batch, warmup, steps)
    peak = peak_flops(device)
    per_token = flops_per_token(cli.model.config, float(causal_share(batch, cli.model.eos_id)) if masked else 1.0)
    result = {
        "config": " + ".join(configs),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "overrides": " ".join(args or []),
        "project_tokens_per_sec": round(project),
        "bare_tokens_per_sec": round(bare_speed) if bare_speed else None,
        "ratio": round(project / bare_speed, 4) if bare_speed else None,
        "mfu": round(project * per_token / peak, 4) if peak else None,
        "bare_mfu": round(bare_speed * per_token / peak, 4) if peak and bare_speed else None,
        "peak_mem_gib": round(project_peak, 2),
        "gpu_sync_steps": timer.sync_steps,
    }
    _print_table(result)
    return result


def _print_table(result: dict) -> None:
    rows = [
        ("", "tokens/s", "MFU"),
        ("project", result["project_tokens_per_sec"], result["mfu"]),
        ("bare loop", result["bare_tokens_per_sec"], result["bare_mfu"]),
    ]
    print(f"\n{result['config']} on {result['device']} (torch {result['torch']})")
    for name, speed, mfu in rows:
        print(f"  {name:<10} {speed!s:>12} {'-' if mfu is None else mfu!s:>8}")
    print(f"  ratio {result['ratio']}, peak memory {result['peak_mem_gib']} GiB  {result['overrides']}")
    if result["gpu_sync_steps"] is not None:
        print(f"  steps that waited for the GPU: {result['gpu_sync_steps']}")


def main(argv: list[str] | None = None) -> None:
    parser = CommandParser(prog="pretrain benchmark", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="the training step against a bare loop")
    train_parser.add_argument(
        "--config",
        required=True,
        action="append",
        help="a training config, e.g. configs/quickstart.yaml (repeatable, composed in order)",
    )
    train_parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator)")
    train_parser.add_argument(
        "--steps", type=int, default=100, help="timed steps; 100 hold two logging steps of the GPU configs"
    )
    train_parser.add_argument(
        "--bare",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time a bare PyTorch loop on the same model and batch",
    )
    data_parser = commands.add_parser("data", help="preparation vs the tokenizer alone, and the loader")
    data_parser.add_argument(
        "--config", action="append", default=[], help="a training config (repeatable): its data section is measured"
    )
    data_parser.add_argument("--batch_size", type=int, default=32, help="loader micro-batch")
    data_parser.add_argument("--seq_len", type=int, default=1024, help="loader blocks hold seq_len + 1 tokens")
    data_parser.add_argument("--batches", type=int, default=300, help="loader batches timed")
    data_parser.add_argument(
        "--processes",
        type=int,
        nargs="+",
        default=None,
        help="instead: time whole preparations by so many processes each, e.g. 1 2",
    )
    options, rest = parser.parse_known_args(argv)  # the rest goes to the config's CLI, e.g. --data.batch_size 16
    if options.command == "train":
        result = train(options.config, options.warmup, options.steps, rest, options.bare)
    elif options.processes:
        result = benchmark_data.preparation_by_processes(config_args(options.config) + rest, options.processes)
    else:  # --config and --data.* describe the data, as for `pretrain prepare`
        result = benchmark_data.data(
            config_args(options.config) + rest, options.batch_size, options.seq_len, options.batches
        )
    sys.stdout.flush()
    print(json.dumps(result))


if __name__ == "__main__":
    run_command(main)
