"""Optimizer parameter groups and the learning-rate schedule used for pretraining."""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from pretrain._compat import scheduler_step_count, set_scheduler_position
from pretrain.errors import UserError

log = logging.getLogger(__name__)


class WarmupSchedule(LRScheduler):
    """A schedule that warms up linearly from 0 to the peak LR over ``warmup_steps``, then follows ``decay``
    (in subclasses) to ``min_lr_ratio`` x peak by ``max_steps``, and stays there.

    Stepped once per optimizer step. From the CLI, ``max_steps`` left unset is taken from
    ``trainer.max_steps``. A checkpoint keeps only the schedule's position: a resumed run follows the
    settings it is started with, and unchanged settings give the uninterrupted run's LRs exactly.
    """

    def __init__(
        self, optimizer: Optimizer, warmup_steps: int, max_steps: int | None, min_lr_ratio: float, last_epoch: int = -1
    ) -> None:
        if max_steps is None or max_steps <= 0:
            raise UserError(f"The LR schedule needs a positive max_steps, got {max_steps}: set trainer.max_steps")
        if warmup_steps < 0:
            raise UserError(f"warmup_steps={warmup_steps} must not be negative.")
        if warmup_steps > max_steps:  # e.g. a smoke run with few steps: fit the schedule instead of refusing
            fitted = max_steps // 10
            if rank_zero_only.rank == 0:
                log.warning(
                    "warmup_steps=%d is longer than max_steps=%d: warming up for %d steps (a tenth of the "
                    "run) instead.",
                    warmup_steps,
                    max_steps,
                    fitted,
                )
            warmup_steps = fitted
        self.warmup_steps, self.max_steps, self.min_lr_ratio = warmup_steps, max_steps, min_lr_ratio
        super().__init__(optimizer, last_epoch)

    def lr_factor(self, step: int) -> float:
        """The multiple of the peak LR used at optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * self.decay(step)

    def decay(self, step: int) -> float:
        """From 1 (the peak) to 0 (the floor), for a step after the warmup."""
        raise NotImplementedError

    def get_lr(self) -> list[float]:
        factor = self.lr_factor(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        """The position alone. PyTorch's default also saves the settings and peak LRs, which on resume would
        replace the ones the run is started with."""
        return {"last_epoch": self.last_epoch, "_step_count": scheduler_step_count(self)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue at the saved position under this schedule's settings. Restored after the optimizer (whose
        saved LRs are the old schedule's): the LRs of the next step are set here."""
        self.last_epoch = state_dict["last_epoch"]
        learning_rates = self.get_lr()
        set_scheduler_position(self, state_dict["_step_count"], learning_rates)
        for group, lr in zip(self.optimizer.param_groups, learning_rates, strict=True):
            if isinstance(group["lr"], torch.Tensor):  # a tensor LR (e.g. capturable optimizers) keeps its device
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr


class WarmupCosineLR(WarmupSchedule):
    """Linear warmup, then cosine decay from the peak to ``min_lr_ratio`` x peak at ``max_steps``.

    On resume, a longer ``max_steps`` stretches the cosine from where the run stands (a finished run's LR
    rises from the floor to the longer cosine's value at that step); a new peak LR, warmup or floor applies
    from the first resumed step.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        max_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        super().__init__(optimizer, warmup_steps, max_steps, min_lr_ratio, last_epoch)

    def decay(self, step: int) -> float:
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress))


DECAY_SHAPES = {
    "linear": lambda progress: 1 - progress,
    "cosine": lambda progress: 0.5 * (1 + math.cos(math.pi * progress)),
    "sqrt": lambda progress: 1 - math.sqrt(progress),  # steep at first, then gentle (Hagele et al., 2024)
}


class WarmupStableDecayLR(WarmupSchedule):
    """Warmup-stable-decay: linear warmup, the peak LR held, then a decay over the last ``decay_fraction`` of
    ``max_steps`` to ``min_lr_ratio`` x peak, shaped ``linear``, ``cosine`` or ``sqrt``.

    The stable phase does not depend on the run's length, so one run can be annealed at several budgets:
    resume a checkpoint of the stable phase with another ``trainer.max_steps`` and the decay takes the last
    ``decay_fraction`` of that length (a run resumed past its decay start goes back to the decaying LR of
    the new length at that step).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        max_steps: int | None = None,
        decay_fraction: float = 0.2,
        decay_shape: Literal["linear", "cosine", "sqrt"] = "linear",
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if not 0 <= decay_fraction <= 1:
            raise UserError(f"decay_fraction={decay_fraction} must be between 0 and 1 (the share of max_steps).")
        if decay_shape not in DECAY_SHAPES:
            raise UserError(f"decay_shape={decay_shape!r}: choose one of {', '.join(DECAY_SHAPES)}.")
        self.decay_fraction, self.decay_shape = decay_fraction, decay_shape
        super().__init__(optimizer, warmup_steps, max_steps, min_lr_ratio, last_epoch)

    def decay(self, step: int) -> float:
        start = max(self.warmup_steps, self.max_steps - round(self.decay_fraction * self.max_steps))
        if step < start:
            return 1.0
        return DECAY_SHAPES[self.decay_shape](min(1.0, (step - start) / max(1, self.max_steps - start)))
