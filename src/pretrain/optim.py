"""Optimizer parameter groups and the learning-rate schedule used for pretraining."""

from __future__ import annotations

import logging
import math

from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from pretrain.errors import UserError

log = logging.getLogger(__name__)


def param_groups(model: nn.Module) -> list[dict]:
    """Linear and embedding weights get the optimizer's weight decay; norm gains (and biases) don't.

    Decaying RMSNorm gains pulls them toward zero for no benefit, which is why every modern
    LM recipe exempts them. Chosen by the layer a parameter belongs to, not by its shape: under
    FSDP1 every parameter is a flat 1-D shard by the time the optimizer is built.
    """
    matrices, vectors, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:  # a tied weight is listed once
                continue
            seen.add(id(param))
            is_matrix = isinstance(module, (nn.Linear, nn.Embedding)) and name == "weight"
            (matrices if is_matrix else vectors).append(param)
    return [{"params": matrices}, {"params": vectors, "weight_decay": 0.0}]


class WarmupCosineLR(LRScheduler):
    """Linear warmup from 0 to the peak LR, then cosine decay to ``min_lr_ratio`` x peak.

    Stepped once per optimizer step; past ``max_steps`` it stays at the floor. From the CLI,
    ``max_steps`` left unset is taken from ``trainer.max_steps``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        max_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        if max_steps is None or max_steps <= 0:
            raise UserError(f"The LR schedule needs a positive max_steps, got {max_steps}: set trainer.max_steps")
        if warmup_steps < 0:
            raise UserError(f"warmup_steps={warmup_steps} must not be negative.")
        if warmup_steps > max_steps:  # e.g. a smoke run with few steps: fit the schedule instead of refusing
            fitted = max_steps // 10
            if rank_zero_only.rank == 0:
                log.warning("warmup_steps=%d is longer than max_steps=%d: warming up for %d steps (a tenth of the "
                            "run) instead.", warmup_steps, max_steps, fitted)  # fmt: skip
            warmup_steps = fitted
        self.warmup_steps, self.max_steps, self.min_lr_ratio = warmup_steps, max_steps, min_lr_ratio
        super().__init__(optimizer, last_epoch)

    def lr_factor(self, step: int) -> float:
        """The multiple of the peak LR used at optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        factor = self.lr_factor(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]
