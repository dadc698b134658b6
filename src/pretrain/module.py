"""The LightningModule: owns the causal LM, its loss, the optimizer wiring and the metrics."""

from __future__ import annotations

import os
import random
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.tensor import DTensor
from torchmetrics import Metric

from pretrain.errors import UserError
from pretrain.export import load_exported_weights
from pretrain.loading import load_checkpoint, model_state_dict
from pretrain.model import GPT, GPTConfig, logits_cross_entropy, next_token_loss
from pretrain.optim import param_groups
from pretrain.parallel import build_sharded_model


class HeldOutLoss(Metric):
    """Mean loss over held-out batches, weighted by their sizes, summed across ranks.

    Not torchmetrics' MeanMetric: it checks every update for NaN on the host, a wait for the GPU
    per batch (and its opt-out drops the weights). Here values stay on the device until
    ``compute``; a NaN loss comes out as a NaN mean.
    """

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("weight", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, loss: torch.Tensor, weight: int) -> None:
        self.total += loss.detach() * weight
        self.weight += weight  # a Python number added in place: no copy to the device

    def compute(self) -> torch.Tensor:
        return self.total / self.weight


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)


class PretrainModule(L.LightningModule):
    """Next-token prediction on blocks of ``seq_len + 1`` tokens.

    Args:
        preset: Name of a model preset in ``pretrain.model.PRESETS``.
        overrides: Architecture fields replaced in the preset, e.g. ``{n_layer: 6}``.
        vocab_size: Set from the data module (its tokenizer); not typed in configs.
        seq_len: Set from the data module; not typed in configs.
        optimizer: Built over the model's parameter groups (weight decay on matrices only).
        lr_scheduler: Built over the optimizer and stepped once per optimizer step.
        compile: ``torch.compile`` the model when it is built.
        compile_mode: ``torch.compile``'s mode. ``max-autotune-no-cudagraphs`` benchmarks Triton
            matmul kernels (with fused epilogues) against cuBLAS for every shape: minutes more
            compilation, sometimes faster steps; measure. Modes with CUDA graphs are left out: a
            graph's outputs are overwritten by its next replay, a hazard for what the loop keeps.
        activation_checkpointing: Recompute each block's activations during backward instead of
            storing them (about a third more compute, much less memory), with any strategy.
        attention_kernel: The ``F.scaled_dot_product_attention`` kernel tried first, the others
            following where it cannot run; None lets PyTorch pick. The kernels compute the same
            attention at different speeds: measure (``scripts/gpu_benchmarks.sh``) before choosing.
        init_from: Start from these weights instead of random ones (continued pretraining): a
            checkpoint of this project or a folder it exported. Only the weights are read.
        max_nonfinite_steps: Consecutive steps with a non-finite loss or gradient norm that are
            skipped (counted in ``train/skipped_steps``) before the run stops with a checkpoint
            of the last good state.
    """

    def __init__(
        self,
        preset: str = "tiny",
        overrides: dict[str, Any] | None = None,
        vocab_size: int = 4096,
        seq_len: int = 256,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        compile: bool = False,
        compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = "default",
        activation_checkpointing: bool = False,
        attention_kernel: Literal["cudnn", "flash", "efficient", "math"] | None = None,
        init_from: str | None = None,
        max_nonfinite_steps: int = 5,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if compile_mode != "default" and not compile:
            raise UserError(f"model.compile_mode: {compile_mode} has no effect without model.compile: true; set both.")
        try:
            self.config = GPTConfig.from_preset(preset, vocab_size=vocab_size, seq_len=seq_len, **(overrides or {}))
        except ValueError as error:
            raise UserError(f"model: {error}. Fix model.preset or model.overrides.") from None
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.model: GPT | None = None
        self.loss_fn = next_token_loss  # replaced by its compiled version in configure_model
        self.val_loss = HeldOutLoss()
        self.skipped_steps = 0  # non-finite steps skipped so far, as last read from the device
        self.nonfinite_streak = 0  # ... of which the most recent ones in a row
        self._nonfinite: torch.Tensor | None = None  # the same two counts, on the device
        self.stop_reason: str | None = None
        # Set by the command line when given --ckpt_path (resuming, evaluating): the checkpoint's weights
        # replace any init_from weights, so those are not read (on every rank, at every restart).
        self.from_checkpoint = False

    def configure_model(self) -> None:
        """Build the model here, not in ``__init__``, so strategies can create it sharded.

        Weights depend only on the run's ``seed_everything`` (which Lightning exports as
        PL_GLOBAL_SEED to every rank), never on the strategy, the device or on randomness drawn
        earlier, e.g. while preparing data. Safe to call twice.
        """
        if self.model is not None:
            return
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        weights = None
        if self.hparams.init_from and not self.from_checkpoint:
            weights = load_pretrained_weights(self.hparams.init_from, self.config)
            with torch.device("meta"):  # shapes only
                expected = GPT(self.config).state_dict()
            raise_on_mismatch(expected, weights, f"The weights in {self.hparams.init_from}")
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 over the data-parallel ranks
            precision = str(self.trainer.precision)
            self.model = build_sharded_model(
                self.config,
                self.device_mesh["data_parallel"],
                self.trainer.strategy.root_device,
                seed,
                param_dtype=torch.bfloat16 if precision.startswith("bf16") else None,
                compile_mode=self.hparams.compile_mode if self.hparams.compile else None,
                weights=weights,
            )
            if self.hparams.compile:  # the blocks are compiled one by one, the loss on its own
                compiled_loss = torch.compile(logits_cross_entropy, mode=self.hparams.compile_mode)
                self.loss_fn = partial(next_token_loss, loss_of_logits=compiled_loss)
        else:
            with torch.device("meta"):  # no throw-away default initialisation
                self.model = GPT(self.config)
            device = torch.get_default_device()  # the strategy's device where it sets one
            self.model.to_empty(device="cpu" if device.type == "meta" else device)
            self.model.init_weights(seed)
            if weights is not None:
                self.model.load_state_dict(weights)
            if self.hparams.compile:  # the whole model and its loss as one graph
                self.loss_fn = torch.compile(next_token_loss, mode=self.hparams.compile_mode)
        self.model.activation_checkpointing = self.hparams.activation_checkpointing
        self.model.use_attention_kernel(self.hparams.attention_kernel)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model, batch)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        # Logged tensors stay on the device until the trainer writes them (every
        # log_every_n_steps), so this call does not synchronise with the GPU each step.
        # (Nothing goes to the progress bar with prog_bar=True: it would be read back at every
        # later step; pretrain.callbacks.LossProgressBar shows the loss.)
        self.log("train/loss", loss)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the learning rate once per optimizer step (not per micro-batch), where it is written:
        a logged Python number is copied to the GPU, and that copy waits for the GPU."""
        if self._writes_logs():
            self.log("train/lr", optimizer.param_groups[0]["lr"])

    def _writes_logs(self) -> bool:
        """Whether the trainer writes this step's logged values out (and so reads them back).

        Also paces the fused optimizers' NaN-guard reads: every 50 steps where logging is off.
        """
        return (self.global_step + 1) % (self.trainer.log_every_n_steps or 50) == 0

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.val_loss.update(self._loss(batch), batch.size(0))

    def on_validation_epoch_end(self) -> None:
        self._log_held_out("val")

    test_step = validation_step  # the same held-out loss, reported as test/*

    def on_test_epoch_end(self) -> None:
        self._log_held_out("test")

    def _log_held_out(self, stage: str) -> None:
        loss = self.val_loss.compute()  # torchmetrics reduces across ranks
        self.val_loss.reset()
        self.log_dict({f"{stage}/loss": loss, f"{stage}/ppl": loss.exp()}, prog_bar=True)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(param_groups(self.model))
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by global norm (also with fused optimizers), log the norm, and guard against NaN/inf.

        Runs after backward, before the optimizer step, on every step. A step whose gradient norm is
        not finite is skipped. Fused optimizers (``fused: true``) skip it on the device, through the
        ``found_inf`` flag they share with gradient scaling, so nothing waits for the GPU; the
        counts are then read back on the logging steps. Other optimizers need the verdict on the
        host: one sync per step.
        """
        if gradient_clip_algorithm not in (None, "norm"):
            raise UserError("Only trainer.gradient_clip_algorithm: norm is supported.")
        max_norm = gradient_clip_val or float("inf")
        if isinstance(self.trainer.model, FullyShardedDataParallel):  # the norm over all shards, not this rank's
            norm = self.trainer.model.clip_grad_norm_(max_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
            if isinstance(norm, DTensor):  # FSDP2: already reduced over the shards
                norm = norm.full_tensor()
        self.log("train/grad_norm", norm)
        nonfinite = ~torch.isfinite(norm)
        skipped, streak = self._nonfinite_counts(norm.device)
        self._nonfinite = torch.stack([skipped + nonfinite, (streak + 1) * nonfinite])
        if self._skips_on_device(optimizer):
            optimizer.found_inf = nonfinite.float()  # the fused step leaves weights and moments alone
            if not self._writes_logs():
                return
        elif nonfinite:
            optimizer.zero_grad(set_to_none=True)  # optimizers skip parameters without gradients
        self._read_nonfinite_counts()
        if self.skipped_steps:
            self.log("train/skipped_steps", float(self.skipped_steps))

    def _skips_on_device(self, optimizer: torch.optim.Optimizer) -> bool:
        """Fused optimizers honour ``found_inf``; with fp16 a GradScaler owns that flag."""
        return bool(optimizer.defaults.get("fused")) and not str(self.trainer.precision).startswith("16")

    def _nonfinite_counts(self, device: torch.device) -> torch.Tensor:
        """(skipped in total, skipped in a row), kept on the device between reads."""
        if self._nonfinite is None:
            self._nonfinite = torch.tensor([self.skipped_steps, self.nonfinite_streak], device=device)
        return self._nonfinite

    def _read_nonfinite_counts(self) -> None:
        """Bring the counts to the host: warn about new skips, stop after too many in a row."""
        if self._nonfinite is None:
            return
        skipped, streak = self._nonfinite.tolist()
        if skipped > self.skipped_steps:
            rank_zero_warn(
                f"Non-finite loss or gradients: {skipped - self.skipped_steps} step(s) skipped by step "
                f"{self.global_step} ({streak} in a row, {skipped} in total)."
            )
        self.skipped_steps, self.nonfinite_streak = skipped, streak
        if streak > self.hparams.max_nonfinite_steps and self.stop_reason is None:
            self.stop_reason = (
                f"The loss or gradients were non-finite for {streak} steps in a row "
                f"(step {self.global_step}); the last good state is saved in the run's checkpoints. "
                "Lower the learning rate or raise warmup, then continue with --ckpt_path last."
            )
            self.trainer.should_stop = True

    def on_train_end(self) -> None:
        self._read_nonfinite_counts()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._read_nonfinite_counts()
        checkpoint["nonfinite_guard"] = {"skipped_steps": self.skipped_steps, "streak": self.nonfinite_streak}
        # Anything random added to training later (dropout, sampling) continues as if never stopped.
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint that does not fit this model, naming each mismatch, before loading it."""
        self.configure_model()
        if "state_dict" in checkpoint:  # absent where the strategy loaded the shards itself (FSDP2)
            raise_on_mismatch(self.state_dict(), checkpoint["state_dict"], "The checkpoint")
        guard = checkpoint.get("nonfinite_guard", {})
        self.skipped_steps, self.nonfinite_streak = guard.get("skipped_steps", 0), guard.get("streak", 0)
        self._nonfinite = None
        if rng := checkpoint.get("rng_states"):
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.device_count() == len(rng["cuda"]):
                torch.cuda.set_rng_state_all(rng["cuda"])
            random.setstate(rng["python"])


def raise_on_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], what: str) -> None:
    """Refuse weights that do not fit the model, listing each differing tensor (embedding first)."""
    expected_shapes = {name: tuple(t.shape) for name, t in expected.items()}
    found_shapes = {name: tuple(t.shape) for name, t in found.items()}
    names = list(expected_shapes) + [name for name in found_shapes if name not in expected_shapes]
    problems = [
        f"{name}: {found_shapes.get(name, 'missing')} vs config {expected_shapes.get(name, 'missing')}"
        for name in names
        if found_shapes.get(name) != expected_shapes.get(name)
    ]
    if problems:
        more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise UserError(
            f"{what} does not fit the configured model (vocabulary, preset or overrides differ):\n  "
            + "\n  ".join(problems[:8])
            + more
            + "\nUse the config the weights were trained with."
        )


def load_pretrained_weights(path: str, config: GPTConfig) -> dict[str, torch.Tensor]:
    """The GPT's weights from a checkpoint (file or sharded folder) or from an exported folder."""
    if (Path(path) / "model.safetensors").is_file():
        return load_exported_weights(path, config)
    return model_state_dict(load_checkpoint(path))
