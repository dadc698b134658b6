"""What a reviewer compares runs by in TensorBoard: an HPARAMS row per run, and loss curves by training tokens."""

from __future__ import annotations

import json
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from pretrain._compat import ends_optimizer_step
from pretrain.callbacks.progress_bar import ends_logging_step
from pretrain.callbacks.run_logger import write_hparams
from pretrain.callbacks.throughput import batch_tokens
from pretrain.callbacks.trackers import write_settings
from pretrain.evals import MultipleChoice
from pretrain.model.config import LlamaConfig
from pretrain.model.llama import Llama

# Written against the number of training tokens seen so far: runs of different batch shapes overlay.
TOKEN_CURVES = {"train/loss": "tokens/train_loss", "val/loss": "tokens/val_loss", "val/bpb": "tokens/val_bpb"}


class RunReview(L.Callback):
    """Records, for TensorBoard, each run's settings with the metrics to compare runs by (HPARAMS tab: final
    ``val/loss``, ``val/bpb``, every task's ``eval/NAME/acc``, ``perf/tokens_per_sec``), and writes
    ``tokens/train_loss``, ``tokens/val_loss`` and ``tokens/val_bpb`` with the training tokens seen so far
    (every rank, every accumulated micro-batch) as their step.

    Reads a value only where the trainer reads it anyway: at logging steps and at the end of a
    validation. A run resumed in its own folder keeps its first HPARAMS entry (one row per run; a new folder
    gets its own) and its token count.
    The ``pretrain`` command adds it to every run.
    """

    def __init__(self) -> None:
        self.tokens_seen = 0
        self.hparams_in = ""  # the run folder that holds this run's HPARAMS entry (kept in checkpoints)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After any checkpoint is restored (sharded strategies restore after ``on_fit_start``)."""
        if not trainer.ckpt_path:  # a new run: its settings in every other tracker (config, params)
            for logger in trainer.loggers:
                write_settings(logger, run_settings(trainer, pl_module))
        loggers = tensorboard_loggers(trainer)
        if not loggers or self.hparams_in == loggers[0].log_dir:
            return  # resumed in the same folder: its row is there already (a new folder gets one)
        tags = ["val/loss", "val/bpb", *task_metrics(trainer), "perf/tokens_per_sec"]
        for logger in loggers:
            write_hparams(logger, run_settings(trainer, pl_module), tags)
        self.hparams_in = loggers[0].log_dir

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self.tokens_seen += batch_tokens(batch, trainer)
        last = 0 < trainer.max_steps <= trainer.global_step and ends_optimizer_step(trainer)  # Lightning logs it too
        if ends_logging_step(trainer) or (last and trainer.log_every_n_steps):
            self._write(trainer, ["train/loss"])

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._write(trainer, ["val/loss", "val/bpb"])

    @rank_zero_only
    def _write(self, trainer: L.Trainer, names: list[str]) -> None:
        for name in names:
            value = trainer.callback_metrics.get(name)
            if value is None:
                continue
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):  # the tokens as the curve's step
                    logger.experiment.add_scalar(TOKEN_CURVES[name], float(value), self.tokens_seen)
                else:  # trackers whose steps must rise with the training step: the tokens beside it, to plot by
                    metrics = {TOKEN_CURVES[name]: float(value), "tokens/seen": float(self.tokens_seen)}
                    logger.log_metrics(metrics, step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"tokens_seen": self.tokens_seen, "hparams_in": self.hparams_in}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens_seen, self.hparams_in = state_dict["tokens_seen"], state_dict["hparams_in"]


def tokens_per_step(trainer: L.Trainer, pl_module: L.LightningModule) -> int:
    """Training tokens per optimizer step: every device, every accumulated micro-batch."""
    batch_size = trainer.datamodule.batch_size
    return batch_size * pl_module.config.seq_len * trainer.accumulate_grad_batches * trainer.world_size


def tensorboard_loggers(trainer: L.Trainer) -> list[TensorBoardLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def task_metrics(trainer: L.Trainer) -> list[str]:
    """``eval/NAME/acc`` of every configured multiple-choice task."""
    names = [name for callback in trainer.callbacks if isinstance(callback, MultipleChoice) for name in callback.tasks]
    return [f"eval/{name}/acc" for name in names]


def parameter_count(config: LlamaConfig) -> int:
    """Of the whole model (tied weights once), counted on a shape-only copy: a sharded one holds a part."""
    with torch.device("meta"):
        return sum(parameter.numel() for parameter in Llama(config).parameters())


def run_settings(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
    """The settings two runs are told apart by, as HPARAMS columns (numbers sort; the rest are text)."""
    config, hparams, data = pl_module.config, pl_module.hparams, trainer.datamodule
    optimizer = trainer.optimizers[0]
    scheduler = trainer.lr_scheduler_configs[0].scheduler if trainer.lr_scheduler_configs else None
    settings = {
        "preset": hparams.preset,
        "overrides": json.dumps(hparams.overrides or {}, sort_keys=True),
        "parameters": parameter_count(config),
        "seq_len": config.seq_len,
        "vocab_size": config.vocab_size,
        "tokens_per_step": tokens_per_step(trainer, pl_module),
        "max_steps": trainer.max_steps,
        "z_loss": hparams.z_loss,
        "optimizer": type(optimizer).__name__,
        "lr": scheduler.base_lrs[0] if scheduler is not None else optimizer.param_groups[0]["lr"],
        "weight_decay": optimizer.defaults.get("weight_decay"),
        "schedule": type(scheduler).__name__ if scheduler is not None else "constant",
        "warmup_steps": getattr(scheduler, "warmup_steps", None),
        "min_lr_ratio": getattr(scheduler, "min_lr_ratio", None),
        "decay_fraction": getattr(scheduler, "decay_fraction", None),  # warmup-stable-decay
        "decay_shape": getattr(scheduler, "decay_shape", None),
        "precision": str(trainer.precision),
        "strategy": type(trainer.strategy).__name__,
        "devices": trainer.world_size,
        "data": data_description(data),
    }
    return {name: value for name, value in settings.items() if value is not None}


def data_description(data: Any) -> str:
    """The sources of a single corpus, or each mixture dataset with its weight."""
    datasets = getattr(data, "datasets", None) or {}
    if list(datasets) == [""]:
        return ", ".join(map(str, datasets[""]["sources"]))
    return ", ".join(f"{name}: {dataset['weight']}" for name, dataset in datasets.items())
