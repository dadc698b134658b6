"""Loss spikes: steps whose loss or gradient norm stands far above the recent ones, and the way back past them.

OLMo-core skips such a step (its batch's update is the spike); PaLM, after a run of them, restarted from a
checkpoint before the spike and skipped the batches around it. ``LossSpikeDetector`` gives the verdict on
the device; ``pretrain.train.step_guard.StepGuard`` skips the step and, after too many in a row, stops the run
with ``rollback_command``'s advice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

from pretrain.checkpointing.last import STEP, checkpoint_problem, checkpoints_newest_first


class LossSpikeDetector:
    """Flags a step whose loss or gradient norm is more than ``sigmas`` standard deviations above the mean of
    the last ``window`` accepted steps. Silent until the window is full; flagged and non-finite steps stay out
    of it. Everything stays on the device: no host read.

    Args:
        window: Accepted steps the mean and deviation are taken over.
        sigmas: How many standard deviations above the mean makes a spike.
    """

    def __init__(self, window: int, sigmas: float) -> None:
        if window < 2 or sigmas <= 0:
            raise ValueError(f"A spike window needs at least 2 steps and a positive threshold, got {window}, {sigmas}.")
        self.window, self.sigmas = window, sigmas
        self.values: torch.Tensor | None = None  # (2, window): loss and gradient norm of recent accepted steps
        self.accepted: torch.Tensor | None = None  # accepted steps so far (int64, 0-d)

    def check(self, loss: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """Whether this step is a spike (a 0-d bool tensor); an accepted step joins the window."""
        now = torch.stack([loss.detach().float(), norm.detach().float()])  # (2,)
        if self.values is None:
            self.values = torch.zeros(2, self.window, device=now.device)
            self.accepted = torch.zeros((), dtype=torch.int64, device=now.device)
        self.values, self.accepted = self.values.to(now.device), self.accepted.to(now.device)
        mean, deviation = self.values.mean(dim=1), self.values.std(dim=1)
        spike = (self.accepted >= self.window) & (now > mean + self.sigmas * deviation).any()
        accept = ~spike & now.isfinite().all()
        slot = (self.accepted % self.window).view(1)  # the oldest value, once the window is full
        kept = torch.where(accept, now, self.values.index_select(1, slot).squeeze(1))
        self.values.index_copy_(1, slot, kept[:, None])
        self.accepted += accept
        return spike

    def state_dict(self) -> dict[str, Any]:
        return {"values": self.values, "accepted": self.accepted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The saved window, unless its length differs from this run's ``window``: then it starts afresh."""
        values = state.get("values")
        if values is not None and values.shape[1] == self.window:
            self.values, self.accepted = values, state.get("accepted")


def rollback_command(trainer: L.Trainer, first_spike: int, last_spike: int) -> str:
    """The command that resumes from the newest checkpoint saved before step ``first_spike`` (0-based), drawing
    and discarding the micro-batches from there to past step ``last_spike``; the stopped run's own last
    checkpoint (already past them) where no earlier one is kept."""
    callback = trainer.checkpoint_callback
    folder = Path(callback.dirpath) if callback is not None and callback.dirpath else None
    earlier = (
        (int(match.group(1)), path)
        for path in (checkpoints_newest_first(folder) if folder else [])
        if (match := STEP.search(path.name)) and not path.is_symlink() and int(match.group(1)) <= first_spike
    )
    config = Path(trainer.log_dir or ".") / "config.yaml"
    found = next(((step, path) for step, path in earlier if checkpoint_problem(path) is None), None)
    if found is None:
        return f"pretrain fit --config {config} --ckpt_path last"
    step, path = found
    batches = (last_spike + 1 - step) * trainer.accumulate_grad_batches
    return f"pretrain fit --config {config} --ckpt_path {path} --data.skip_batches {batches}"
