"""Callbacks that show what the model learns while it trains."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from tokenizers import Tokenizer
from torch.distributed.fsdp import FullyShardedDataParallel

from pretrain._compat import ends_optimizer_step
from pretrain.generate import continue_text


class TextSamples(L.Callback):
    """After each validation, continue a few prompts greedily and log them to TensorBoard's text tab.

    Every rank generates (sharded models need all ranks in each forward); rank 0 logs. With a KV
    cache and a few dozen tokens this costs a fraction of one validation.

    Args:
        prompts: Texts to continue; an empty string starts a new document.
        max_new_tokens: Tokens generated per prompt.
    """

    def __init__(self, prompts: list[str], max_new_tokens: int = 48) -> None:
        self.prompts = prompts
        self.max_new_tokens = max_new_tokens
        self.tokenizer: Tokenizer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # After prepare_data, so the tokenizer file exists; read once, not at every validation.
        self.tokenizer = Tokenizer.from_file(str(trainer.datamodule.tokenizer_path))

    def samples(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[str]:
        """The continuation of each prompt, on every rank."""
        with torch.no_grad(), torch.compiler.set_stance("force_eager"), gathered_weights(trainer.strategy.model):
            # New shapes at each token: run eagerly rather than recompile.
            return [continue_text(pl_module.model, self.tokenizer, p, self.max_new_tokens) for p in self.prompts]

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        samples = self.samples(trainer, pl_module)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    text = "\n\n".join(
                        f"    {p}{s}".replace("\n", "\n    ") for p, s in zip(self.prompts, samples, strict=True)
                    )
                    logger.experiment.add_text("samples", text, trainer.global_step)


def gathered_weights(wrapped: torch.nn.Module) -> AbstractContextManager:
    """FSDP1 gathers a unit's weights only inside that unit's own forward, and the root unit (embedding,
    final norm, LM head) wraps the whole LightningModule: sampling, which calls the inner model token
    by token, gathers every weight for its duration instead (read-only; each rank briefly holds the
    full fp32 weights). FSDP2 gathers per call."""
    if isinstance(wrapped, FullyShardedDataParallel):
        return FullyShardedDataParallel.summon_full_params(wrapped, writeback=False)
    return nullcontext()


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
        every = trainer.log_every_n_steps
        if every and trainer.global_step % every == 0 and ends_optimizer_step(trainer):
            loss = trainer.callback_metrics.get("train/loss")
            if loss is not None:
                self.loss = float(loss)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        if self.loss is not None:
            metrics["loss"] = f"{self.loss:.3f}"
        return metrics
