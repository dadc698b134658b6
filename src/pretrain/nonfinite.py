"""The non-finite guard: skip optimizer steps whose gradients are NaN or infinite, stop a run that keeps diverging."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from pretrain.errors import TrainingDiverged


class NonFiniteGuard:
    """Counts steps whose global gradient norm is not finite, skips them, and stops after too many in a row.

    A skipped step leaves the weights and the optimizer state untouched. Fused optimizers skip it on the
    device, through the ``found_inf`` flag they share with gradient scaling, so nothing waits for the GPU;
    the counts then stay on the device and are read only when asked (the logging steps, saves, the end).
    Other optimizers need the verdict on the host: one read per step.

    Args:
        max_in_a_row: Consecutive non-finite steps tolerated; one more stops the run (after a checkpoint of
            the last good state) and ``raise_if_stopped`` reports it.
    """

    def __init__(self, max_in_a_row: int) -> None:
        self.max_in_a_row = max_in_a_row
        self.skipped = 0  # non-finite steps skipped so far, as last read from the device
        self.in_a_row = 0  # ... of which the most recent ones in a row
        self.stop_message: str | None = None
        self._counts: torch.Tensor | None = None  # the same two counts, on the device, between reads

    def check(self, norm: torch.Tensor, optimizer: torch.optim.Optimizer, on_device: bool, read: bool,
              trainer: L.Trainer) -> bool:  # fmt: skip
        """Judge this step by its gradient norm, before the optimizer steps; return whether the counts were read.

        ``on_device``: the optimizer honours ``found_inf`` (fused, without a gradient scaler owning it).
        ``read``: bring the counts to the host now (always so without ``on_device``).
        """
        nonfinite = ~torch.isfinite(norm)
        if self._counts is None:
            self._counts = torch.tensor([self.skipped, self.in_a_row], device=norm.device)
        skipped, in_a_row = self._counts
        self._counts = torch.stack([skipped + nonfinite, (in_a_row + 1) * nonfinite])
        if on_device:
            optimizer.found_inf = nonfinite.float()  # the fused step leaves weights and moments alone
            if not read:
                return False
        elif nonfinite:
            optimizer.zero_grad(set_to_none=True)  # optimizers skip parameters without gradients
        self.read(trainer)
        return True

    def read(self, trainer: L.Trainer) -> None:
        """Bring the counts to the host: warn about new skips, ask the trainer to stop after too many in a row."""
        if self._counts is None:
            return
        skipped, in_a_row = self._counts.tolist()
        if skipped > self.skipped:
            rank_zero_warn(
                f"Non-finite loss or gradients: {skipped - self.skipped} step(s) skipped by step "
                f"{trainer.global_step} ({in_a_row} in a row, {skipped} in total)."
            )
        self.skipped, self.in_a_row = skipped, in_a_row
        if in_a_row > self.max_in_a_row and self.stop_message is None:
            self.stop_message = (
                f"The loss or gradients were non-finite for {in_a_row} steps in a row "
                f"(step {trainer.global_step}); the last good state is saved in the run's checkpoints. "
                "Lower the learning rate or raise warmup, then continue with --ckpt_path last."
            )
            trainer.should_stop = True

    def raise_if_stopped(self) -> None:
        if self.stop_message is not None:
            raise TrainingDiverged(self.stop_message)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped, "streak": self.in_a_row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped, self.in_a_row = state.get("skipped_steps", 0), state.get("streak", 0)
        self._counts = None
