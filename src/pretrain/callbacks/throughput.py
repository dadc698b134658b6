"""Training speed in tokens per second and model FLOPs utilisation (MFU), logged without GPU syncs."""

from __future__ import annotations

import time

import lightning as L
import torch
from torch import nn

from pretrain._compat import ends_optimizer_step
from pretrain.model.config import LlamaConfig
from pretrain.model.document_mask import attended_pairs
from pretrain.model.llama import Llama

# Dense bf16 peak of one chip, FLOP/s, by a substring of torch.cuda.get_device_name(), the first that
# matches: the PCIe and NVL cards run at lower clocks than the SXM ones ("NVIDIA H100 80GB HBM3").
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200 NVL": 835e12,
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "4090": 165e12,
}


def flops_per_token(config: LlamaConfig, attention_share: float = 1.0) -> float:
    """PaLM's count for a training step: 6 x (weights of all Linear layers, LM head included)
    for the matmuls forward and backward, plus 12 x layers x width x context for causal attention,
    times ``attention_share``: the share of causal attention's (query, key) pairs computed
    (``causal_share``; below 1 under document masking).

    Counted on a shape-only copy of the model: a sharded one (FSDP) holds only its shard."""
    with torch.device("meta"):
        model = Llama(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return 6 * linear + 12 * config.n_layer * config.attention_dim * config.seq_len * attention_share


def causal_share(batch: torch.Tensor, eot_id: int) -> torch.Tensor:
    """The (query, key) pairs document masking keeps in blocks of ``seq_len + 1`` tokens, as a share of causal
    attention's; a 0-d tensor on the batch's device."""
    B, T = batch.size(0), batch.size(1) - 1
    return attended_pairs(batch[:, :-1], eot_id) / (B * T * (T + 1) / 2)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def batch_tokens(batch: torch.Tensor, trainer: L.Trainer) -> int:
    """Training tokens of one micro-batch of blocks of ``seq_len + 1`` on every rank, from its shape alone."""
    return batch.size(0) * (batch.size(1) - 1) * trainer.world_size


class Throughput(L.Callback):
    """Logs ``perf/tokens_per_sec`` (all devices together) and ``perf/mfu`` every ``interval`` steps.

    Wall-clock time between two logging steps, with no ``cuda.synchronize``: the GPU queue is bounded,
    so over ``interval`` steps the host's clock measures the device's pace. Validation (text samples
    included) and checkpoint saves are left out: after either, the interval's count starts again
    at the next batch (both end by waiting for the GPU, so the clock restarts on an idle device).
    MFU is logged where the chip's peak is known (see ``PEAK_BF16_FLOPS``; pass ``peak_flops`` for
    others); under document masking it counts the attention the mask leaves to do, averaged over
    the interval's batches on the device and read at the logging step.
    """

    def __init__(self, interval: int = 50, peak_flops: float | None = None) -> None:
        self.interval = interval
        self.peak = peak_flops
        self._tokens = 0
        self._started: float | None = None
        self._matmul_flops = self._attention_flops = 0.0  # per token; attention's for causal attention
        self._paused = False  # validation or a checkpoint save since the last batch
        self._shares: torch.Tensor | float = 0.0  # summed causal_share of the interval's batches (document masking)
        self._batches = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._matmul_flops = flops_per_token(pl_module.config, attention_share=0.0)
        self._attention_flops = flops_per_token(pl_module.config) - self._matmul_flops
        self.peak = self.peak or peak_flops(pl_module.device)
        self._tokens, self._started = 0, None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._paused = True

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._paused = True

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        if self._paused and self._started is not None:
            self._restart(time.perf_counter())
        self._paused = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self._started is None:  # the first step includes warm-up (compilation, allocator): not counted
            self._started = time.perf_counter()
            return
        self._tokens += batch_tokens(batch, trainer)
        if self.peak and pl_module.hparams.attention_mask == "document":
            self._shares, self._batches = self._shares + causal_share(batch, pl_module.eos_id), self._batches + 1
        if trainer.global_step % self.interval or not ends_optimizer_step(trainer):
            return
        now = time.perf_counter()
        tokens_per_sec = self._tokens / (now - self._started)
        metrics = {"perf/tokens_per_sec": tokens_per_sec}
        if self.peak:
            share = float(self._shares) / self._batches if self._batches else 1.0  # the one host read, here
            flops = self._matmul_flops + self._attention_flops * share
            metrics["perf/mfu"] = tokens_per_sec * flops / (self.peak * trainer.world_size)
        for logger in trainer.loggers:  # straight to the loggers: written once, at this step
            logger.log_metrics(metrics, step=trainer.global_step)
        self._restart(now)

    def _restart(self, now: float) -> None:
        self._tokens, self._started, self._shares, self._batches = 0, now, 0.0, 0
