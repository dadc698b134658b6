"""The LightningModule: builds the causal LM, computes its loss, wires the optimizer and logs."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import FSDPStrategy

from pretrain._compat import attached_trainer
from pretrain.checkpointing.loading import load_weights, raise_on_mismatch
from pretrain.checkpointing.random_states import random_states, restore_random_states
from pretrain.errors import UserError
from pretrain.model.document_mask import AttentionMask, AttentionMaskName, document_mask
from pretrain.model.hf_check import check_against_transformers
from pretrain.model.hf_config import model_architecture, source_model_record
from pretrain.model.hf_layout import is_hf_folder
from pretrain.model.llama import Llama
from pretrain.model.losses import next_token_loss
from pretrain.train.compile_check import CompileSetting, compiles
from pretrain.train.host_memory import keep_freed_memory
from pretrain.train.loss_spikes import LossSpikeDetector
from pretrain.train.metrics import HeldOutMetrics
from pretrain.train.parallel import build_training_model, clip_global_grad_norm, receive_weights_at_wrap
from pretrain.train.param_groups import param_groups
from pretrain.train.step_guard import StepGuard


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over every process, queued on the device: no barrier (Lightning's ``reduce`` waits
    at one, and with NCCL a barrier waits for the GPU)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    total = value.clone()
    dist.all_reduce(total)  # a sum: gloo has no average
    return total / dist.get_world_size()


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)


class PretrainModule(L.LightningModule):
    """Next-token prediction on blocks of ``seq_len + 1`` tokens.

    Args:
        preset: Name of a model preset in ``pretrain.model.config.PRESETS``.
        overrides: Architecture fields replaced in the preset, e.g. ``{n_layer: 6}``.
        vocab_size: Set from the data module (its tokenizer); not typed in configs.
        seq_len: Set from the data module; not typed in configs.
        optimizer: Built over the model's parameter groups (weight decay on matrices only).
        lr_scheduler: Built over the optimizer and stepped once per optimizer step.
        compile: ``torch.compile`` the model (with its loss) when it is built; ``auto``: where the machine can (a CPU
            needs a C++ compiler for it), eagerly elsewhere.
        compile_mode: ``torch.compile``'s mode; ``max-autotune-no-cudagraphs`` tunes Triton matmuls (minutes
            more compilation; measure). CUDA-graph modes are left out: a replay overwrites what the loop keeps.
        activation_checkpointing: Recompute each block's activations in backward instead of storing them.
        attention_kernel: The ``scaled_dot_product_attention`` kernel tried first; None lets PyTorch pick. Not used
            under ``attention_mask: document`` on CUDA, which runs FlexAttention.
        init_from: Start from these weights instead of random ones: a checkpoint, or a Hugging Face folder
            (``pretrain export``'s, or a Llama or Qwen3 that ``transformers`` saved), whose ``config.json`` then
            defines the architecture (``preset`` unused; ``overrides`` must agree with it). A resumed run loads
            the checkpoint's weights, not these, but still reads a folder's ``config.json``.
        max_nonfinite_steps: Consecutive non-finite steps skipped before the run stops (``StepGuard``).
        spike_window: Skip a step whose loss or gradient norm is more than ``spike_sigmas`` standard deviations
            above the mean of the last ``spike_window`` good steps (``pretrain.train.loss_spikes``); 0 turns it off.
        spike_sigmas: The threshold of a spike, in standard deviations.
        max_spike_steps: Consecutive spikes skipped before the run saves, stops and prints the command that
            rolls back to an earlier checkpoint past their batches.
        z_loss: Weight of the z-loss (the mean squared log of the softmax's normaliser, PaLM; 1e-4 is usual)
            added to the training loss; logged as ``train/z_loss``. 0 leaves it out.
        attention_mask: ``causal``, or ``document``: a token attends only to earlier tokens of its own document
            (the end-of-text token closes one), in training and held-out scoring (``pretrain.model.document_mask``).
    """

    def __init__(
        self,
        preset: str = "tiny",
        overrides: dict[str, Any] | None = None,
        vocab_size: int = 4096,
        seq_len: int = 256,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        compile: CompileSetting = False,
        compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = "default",
        activation_checkpointing: bool = False,
        attention_kernel: Literal["cudnn", "flash", "efficient", "math"] | None = None,
        init_from: str | None = None,
        max_nonfinite_steps: int = 5,
        spike_window: int = 0,
        spike_sigmas: float = 6.0,
        max_spike_steps: int = 10,
        z_loss: float = 0.0,
        attention_mask: AttentionMaskName = "causal",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if compile_mode != "default" and compile is False:
            raise UserError(f"model.compile_mode: {compile_mode} has no effect without model.compile: true; set both.")
        self.config = model_architecture(preset, overrides, vocab_size, seq_len, init_from)
        self.source_model = source_model_record(init_from)  # carried by every checkpoint, for export
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.model: Llama | None = None
        self.loss_fn = next_token_loss  # replaced by its compiled version in configure_model
        self.held_out_loss_fn = next_token_loss  # likewise
        self.held_out = HeldOutMetrics()
        self.dataset_held_out = torch.nn.ModuleList()  # per dataset of a mixture, made as their loaders appear
        self.register_buffer("token_bytes", None, persistent=False)  # bytes per token id, from the data (setup)
        self.eos_id = -1
        try:
            spikes = LossSpikeDetector(spike_window, spike_sigmas) if spike_window else None
        except ValueError as error:
            raise UserError(f"model.spike_window / model.spike_sigmas: {error}") from None
        self.step_guard = StepGuard(max_nonfinite_steps, spikes, max_spike_steps)
        self.restoring = False  # a checkpoint's weights will replace init_from's: not read (set by the CLI)
        self._step_loss: torch.Tensor | None = None  # summed over the micro-batches of this step, for spikes
        self._micro_batches = 0

    def configure_model(self) -> None:
        """Built here, not in ``__init__``, so strategies can create it sharded; safe to call twice. Weights follow
        the run's seed (PL_GLOBAL_SEED on every rank) alone, or come from ``init_from``."""
        if self.model is not None:
            return
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        mesh = self.device_mesh["data_parallel"] if self.device_mesh is not None else None  # FSDP2's ranks
        trainer = attached_trainer(self)
        fsdp1 = trainer is not None and trainer.world_size > 1 and isinstance(trainer.strategy, FSDPStrategy)
        weights = self._initial_weights(sharded=mesh is not None or fsdp1)
        if fsdp1 and weights is not None:
            receive_weights_at_wrap(trainer.strategy)
        target = trainer.strategy.root_device if trainer is not None else torch.get_default_device()
        device = target if mesh else torch.get_default_device()  # sharded: made on the strategy's device
        bf16 = mesh is not None and str(self.trainer.precision).startswith("bf16")  # FSDP2 gathers in bf16
        compile_mode = self.hparams.compile_mode if compiles(self.hparams.compile, target) else None
        self.model, self.loss_fn = build_training_model(
            self.config, seed, device, mesh, torch.bfloat16 if bf16 else None, compile_mode, weights
        )
        # Held-out text is scored token by token (bits per byte); compiled like the loss where it is compiled whole,
        # on GPUs only, where it spares GBs of fp32 logits (on a CPU its compile outweighs its gain: docs/design.md).
        whole = compile_mode is not None and mesh is None and target.type == "cuda"
        self.held_out_loss_fn = torch.compile(next_token_loss, mode=compile_mode) if whole else next_token_loss
        self.model.activation_checkpointing = self.hparams.activation_checkpointing
        self.model.use_attention_kernel(self.hparams.attention_kernel)

    def _initial_weights(self, sharded: bool) -> dict[str, torch.Tensor] | None:
        """``init_from``'s weights, unless the run resumes (the checkpoint's replace them). Sharded (FSDP2 or FSDP1),
        rank 0 alone reads them and the others receive their shards from it (an empty dict here). A Hugging Face
        folder's are checked to the logit against ``transformers`` on rank 0; every rank stops on its verdict."""
        if not self.hparams.init_from or self.restoring:
            return None
        trainer = attached_trainer(self)
        global_zero = trainer is None or trainer.is_global_zero
        weights: dict[str, torch.Tensor] = {}
        problem = None
        if global_zero or not sharded:
            try:
                weights = load_weights(self.hparams.init_from, self.config)
                if global_zero and is_hf_folder(self.hparams.init_from):
                    problem = check_against_transformers(Path(self.hparams.init_from), self.config, weights)
            except UserError as error:
                problem = str(error)
            except Exception as error:  # said on every rank, rather than a traceback here and the others waiting
                problem = f"Reading the weights of {self.hparams.init_from} failed: {type(error).__name__}: {error}"
        if trainer is not None and trainer.world_size > 1:
            problem = trainer.strategy.broadcast(problem)
        if problem:
            raise UserError(problem)
        return weights

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def attention_mask_of(self, batch: torch.Tensor) -> AttentionMask | None:
        """The attention mask of a batch of blocks (None: causal), built on the device outside the compiled loss."""
        if self.hparams.attention_mask == "causal":
            return None
        return document_mask(batch[:, :-1], self.eos_id)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        mask = self.attention_mask_of(batch)
        loss, z_loss = self.loss_fn(self.model, batch, mask=mask, z_loss=self.hparams.z_loss > 0)
        total = loss
        if z_loss is not None:
            total = loss + self.hparams.z_loss * z_loss
            self.log("train/z_loss", z_loss)
        # Stays on the device until the trainer writes it (every log_every_n_steps): no wait for the GPU.
        # Not prog_bar=True, which would read it back at every step; callbacks.LossProgressBar shows it.
        self.log("train/loss", loss)  # the cross-entropy alone, comparable between runs with and without z-loss
        if self.step_guard.spikes is not None:
            self._step_loss = loss.detach() if self._micro_batches == 0 else self._step_loss + loss.detach()
            self._micro_batches += 1
        return total

    def on_train_batch_end(self, outputs: Any, batch: torch.Tensor, batch_idx: int) -> None:
        if 0 < self.trainer.max_steps <= self.global_step:
            self.trainer.should_stop = True  # Lightning then validates this last step, whatever the interval

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The learning rate, once per optimizer step and only where written: a logged Python number is
        copied to the GPU, and that copy waits for the GPU."""
        if self._writes_logs():
            self.log("train/lr", optimizer.param_groups[0]["lr"])

    def _writes_logs(self) -> bool:
        """Whether the trainer writes this step's logs (every 50 steps where logging is off)."""
        return (self.global_step + 1) % (self.trainer.log_every_n_steps or 50) == 0

    def setup(self, stage: str) -> None:
        """The bytes each token stands for, from the data's tokenizer, for bits per byte (none without it).

        On the CPU, where each step and each held-out batch frees and allocates its activations again, freed pages
        are kept for the next one (``host_memory``): from here on only, so that the data's preparation, which
        comes before, still gives its memory back."""
        if self.trainer.strategy.root_device.type == "cpu":
            keep_freed_memory()
        table = getattr(self.trainer.datamodule, "token_byte_table", None)
        if table is not None and self.token_bytes is None:
            lengths, self.eos_id = table()
            self.token_bytes = torch.tensor(lengths, dtype=torch.int64, device=self.device)
        if self.hparams.attention_mask == "document" and self.eos_id < 0:
            raise UserError(
                "model.attention_mask: document needs the data's end-of-text token, and this data module gives "
                "none (no token_byte_table()). Use a data module that does, or model.attention_mask: causal."
            )

    def validation_step(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> None:
        """One held-out loader per dataset of a mixture (``dataloader_idx``), each also counted in the total."""
        losses = self.held_out_loss_fn(self.model, batch, self.attention_mask_of(batch), per_token=True).ce
        targets = batch[:, 1:].long()
        self.held_out.update(losses, targets, self.token_bytes, self.eos_id)
        if self._dataset_names():
            while len(self.dataset_held_out) <= dataloader_idx:
                self.dataset_held_out.append(HeldOutMetrics().to(self.device))
            self.dataset_held_out[dataloader_idx].update(losses, targets, self.token_bytes, self.eos_id)

    def on_validation_epoch_end(self) -> None:
        self._log_held_out("val")

    test_step = validation_step  # the same held-out loss, reported as test/*

    def on_test_epoch_end(self) -> None:
        self._log_held_out("test")

    def _log_held_out(self, stage: str) -> None:
        with_bpb = self.token_bytes is not None
        results = self.held_out.results(stage, with_bpb)  # torchmetrics reduces across ranks
        self.log_dict({**results, f"{stage}/ppl": results[f"{stage}/loss"].exp()}, prog_bar=True)
        for name, metrics in zip(self._dataset_names(), self.dataset_held_out, strict=False):
            self.log_dict(metrics.results(f"{stage}/{name}", with_bpb))  # what mixture weights are tuned by

    def _dataset_names(self) -> list[str]:
        """A mixture's datasets, in the order of their held-out loaders; none for a single corpus."""
        return getattr(self.trainer.datamodule, "held_out_names", [])

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
        """Clip by global norm on every step (also with fused optimizers), log the norm, guard against NaN/inf."""
        if gradient_clip_algorithm not in (None, "norm"):
            raise UserError("Only trainer.gradient_clip_algorithm: norm is supported.")
        norm = clip_global_grad_norm(self.trainer.model, self.model, gradient_clip_val or float("inf"))
        self.log("train/grad_norm", norm)
        # Fused optimizers honour found_inf; with fp16 a gradient scaler owns that flag.
        on_device = bool(optimizer.defaults.get("fused")) and not str(self.trainer.precision).startswith("16")
        loss = None
        if self._micro_batches:  # the step's loss, the same on every rank, so that all ranks skip alike
            loss = mean_over_ranks(self._step_loss / self._micro_batches)
            self._micro_batches = 0
        read = self.step_guard.check(norm, loss, optimizer, on_device, read=self._writes_logs(), trainer=self.trainer)
        if read and self.step_guard.skipped:
            self.log("train/skipped_steps", float(self.step_guard.skipped))

    def on_train_end(self) -> None:
        self.step_guard.read(self.trainer)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.step_guard.read(self.trainer)
        checkpoint["architecture"] = dataclasses.asdict(self.config)  # also where init_from's folder set it
        checkpoint["step_guard"] = self.step_guard.state_dict()
        if self.source_model:
            checkpoint["source_model"] = self.source_model
        checkpoint["rng_states"] = random_states()  # anything random added later continues as if never stopped

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint that does not fit this model, naming each mismatch, before loading it."""
        self.configure_model()
        if "state_dict" in checkpoint:  # absent where the strategy loaded the shards itself (FSDP2)
            raise_on_mismatch(self.state_dict(), checkpoint["state_dict"], "The checkpoint")
        self.step_guard.load_state_dict(checkpoint["step_guard"])
        restore_random_states(checkpoint["rng_states"])
