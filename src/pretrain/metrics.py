"""Metrics summed on the device and read once, at the end of an evaluation."""

from __future__ import annotations

import torch
from torchmetrics import Metric


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
