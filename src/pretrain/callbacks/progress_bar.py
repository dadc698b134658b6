"""A progress bar that shows the training loss without waiting for the GPU at every step."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

from pretrain._compat import ends_optimizer_step


def ends_logging_step(trainer: L.Trainer) -> bool:
    """Whether the batch just trained ended an optimizer step whose logs the trainer writes (every
    ``log_every_n_steps``): where it waits for the GPU anyway, so a callback may read a value too."""
    every = trainer.log_every_n_steps
    return bool(every) and trainer.global_step % every == 0 and ends_optimizer_step(trainer)


class LossProgressBar(TQDMProgressBar):
    """A progress bar that shows the training loss without waiting for the GPU at every step.

    A value logged with ``prog_bar=True`` is read back from the GPU at every later step: a full
    synchronisation each step. This bar instead reads ``train/loss`` once per logging step (every
    ``log_every_n_steps`` optimizer steps), where the trainer waits for the GPU anyway.
    """

    def __init__(self, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.loss: float | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if ends_logging_step(trainer):
            loss = trainer.callback_metrics.get("train/loss")
            if loss is not None:
                self.loss = float(loss)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Numbers to four significant digits, as text, trailing zeros kept (1.9 as 1.900): Lightning's bar
        would show three, padded with a zero (a ``val/bpb`` of 1.6833 as 1.680), a figure TensorBoard never shows."""
        metrics = super().get_metrics(trainer, pl_module)
        if self.loss is not None:
            metrics["loss"] = f"{self.loss:.3f}"
        return {name: f"{value:#.4g}" if isinstance(value, float) else value for name, value in metrics.items()}
