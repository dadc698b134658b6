"""The step guard: skip optimizer steps whose gradients are NaN or infinite or whose loss spikes, and stop a run
that keeps doing so."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from pretrain.errors import TrainingDiverged
from pretrain.train.loss_spikes import LossSpikeDetector, rollback_command


class StepGuard:
    """Counts the steps it skips: those whose global gradient norm is not finite, and (with a ``spikes``
    detector) those whose loss or gradient norm spikes. Stops the run after too many of either in a row.

    A skipped step leaves the weights and the optimizer state untouched. Fused optimizers skip it on the
    device, through the ``found_inf`` flag they share with gradient scaling, so nothing waits for the GPU;
    the counts then stay on the device and are read only when asked (the logging steps, saves, the end).
    Other optimizers need the verdict on the host: one read per step.

    Args:
        max_in_a_row: Consecutive non-finite steps tolerated; one more stops the run (after a checkpoint of
            the last good state) and ``raise_if_stopped`` reports it.
        spikes: The loss-spike detector, or None to skip non-finite steps only.
        max_spikes_in_a_row: Consecutive spikes tolerated; past that (as read) the run saves, stops, and
            ``raise_if_stopped`` prints the command that rolls back past their batches.
    """

    def __init__(
        self, max_in_a_row: int, spikes: LossSpikeDetector | None = None, max_spikes_in_a_row: int = 10
    ) -> None:
        self.max_in_a_row = max_in_a_row
        self.spikes, self.max_spikes_in_a_row = spikes, max_spikes_in_a_row
        self.skipped = 0  # steps skipped so far (non-finite or spikes), as last read from the device
        self.in_a_row = 0  # the most recent non-finite steps in a row
        self.spikes_in_a_row = 0  # the most recent spikes in a row
        self.stop_message: str | None = None
        self._spike_stop: tuple[int, int] | None = None  # the first and last step of the streak that stopped the run
        self._counts: torch.Tensor | None = None  # the three counts, on the device, between reads
        self._last_judged = -1  # the index of the last step judged

    def check(
        self,
        norm: torch.Tensor,
        loss: torch.Tensor | None,
        optimizer: torch.optim.Optimizer,
        on_device: bool,
        read: bool,
        trainer: L.Trainer,
    ) -> bool:
        """Judge this step by its gradient norm (and ``loss``, the step's mean over ranks and micro-batches, for
        spikes) before the optimizer steps; return whether the counts were read.

        ``on_device``: the optimizer honours ``found_inf`` (fused, without a gradient scaler owning it).
        ``read``: bring the counts to the host now (always so without ``on_device``).
        """
        self._last_judged = trainer.global_step
        nonfinite = ~torch.isfinite(norm)
        spike = torch.zeros_like(nonfinite)
        if self.spikes is not None and loss is not None:
            spike = self.spikes.check(loss, norm) & ~nonfinite
        skip = nonfinite | spike
        if self._counts is None:
            self._counts = torch.tensor([self.skipped, self.in_a_row, self.spikes_in_a_row], device=norm.device)
        skipped, in_a_row, spikes_in_a_row = self._counts
        self._counts = torch.stack([skipped + skip, (in_a_row + 1) * nonfinite, (spikes_in_a_row + 1) * spike])
        if on_device:
            optimizer.found_inf = skip.float()  # the fused step leaves weights and moments alone
            if not read:
                return False
        elif skip:
            optimizer.zero_grad(set_to_none=True)  # optimizers skip parameters without gradients
        self.read(trainer)
        return True

    def read(self, trainer: L.Trainer) -> None:
        """Bring the counts to the host: warn about new skips, ask the trainer to stop after too many in a row."""
        if self._counts is None:
            return
        skipped, in_a_row, spikes_in_a_row = self._counts.tolist()
        if skipped > self.skipped:
            rank_zero_warn(
                f"Non-finite loss or gradients, or loss spikes: {skipped - self.skipped} step(s) skipped by step "
                f"{trainer.global_step} ({in_a_row} non-finite and {spikes_in_a_row} spikes in a row, {skipped} "
                "in total)."
            )
        self.skipped, self.in_a_row, self.spikes_in_a_row = skipped, in_a_row, spikes_in_a_row
        if self.stop_message is not None:
            return
        if in_a_row > self.max_in_a_row:
            self.stop_message = (
                f"The loss or gradients were non-finite for {in_a_row} steps in a row "
                f"(step {trainer.global_step}); the last good state is saved in the run's checkpoints. "
                "Lower the learning rate or raise warmup, then continue with --ckpt_path last."
            )
            trainer.should_stop = True
        elif spikes_in_a_row > self.max_spikes_in_a_row:
            self._spike_stop = (self._last_judged - spikes_in_a_row + 1, self._last_judged)
            self.stop_message = f"Loss spikes: {spikes_in_a_row} steps in a row"
            trainer.should_stop = True

    def raise_if_stopped(self, trainer: L.Trainer) -> None:
        if self.stop_message is None:
            return
        if self._spike_stop is None:
            raise TrainingDiverged(self.stop_message)
        first, last = self._spike_stop
        window, sigmas = self.spikes.window, self.spikes.sigmas
        raise TrainingDiverged(
            f"{self.stop_message} (steps {first} to {last}) had a loss or gradient norm over {sigmas:g} standard "
            f"deviations above the last {window} good steps', and were skipped; the weights from before them are "
            "saved. Roll back to an earlier checkpoint and discard the batches from there to past the spikes:\n"
            f"  {rollback_command(trainer, first, last)}\n"
            "If spikes come back, lower the learning rate or raise warmup."
        )

    def state_dict(self) -> dict[str, Any]:
        state = {"skipped_steps": self.skipped, "streak": self.in_a_row, "spike_streak": self.spikes_in_a_row}
        return {**state, "spike_window": self.spikes.state_dict()} if self.spikes else state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped, self.in_a_row = state.get("skipped_steps", 0), state.get("streak", 0)
        self.spikes_in_a_row = state.get("spike_streak", 0)
        if self.spikes and "spike_window" in state:
            self.spikes.load_state_dict(state["spike_window"])
        self._counts = None
