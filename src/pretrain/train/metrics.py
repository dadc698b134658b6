"""Metrics summed on the device and read once, at the end of an evaluation."""

from __future__ import annotations

import math

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


class BitsPerByte(Metric):
    """Bits per UTF-8 byte of held-out text: the next-token losses of the targets that stand for text (not the
    end-of-text token, nor any of no bytes, such as a beginning token), in bits, over the bytes they stand for.
    Unlike nats per token it does not depend on the tokenizer, so runs with different vocabularies compare.
    Summed on the device, read at ``compute``."""

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nats", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("bytes", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, losses: torch.Tensor, targets: torch.Tensor, token_bytes: torch.Tensor, eos_id: int) -> None:
        """``losses``, ``targets``: (B, T); ``token_bytes``: bytes per token id."""
        text = (targets != eos_id) & (token_bytes[targets] > 0)
        self.nats += losses.detach().double().mul(text).sum()
        self.bytes += token_bytes[targets].mul(text).sum()

    def compute(self) -> torch.Tensor:
        return self.nats / math.log(2) / self.bytes


class HeldOutMetrics(torch.nn.Module):
    """What a validation reports on one set of held-out text: its loss (nats per token) and, where the
    tokenizer's byte lengths are known, its bits per byte."""

    def __init__(self) -> None:
        super().__init__()
        self.loss = HeldOutLoss()
        self.bpb = BitsPerByte()

    def update(
        self, losses: torch.Tensor, targets: torch.Tensor, token_bytes: torch.Tensor | None, eos_id: int
    ) -> None:
        self.loss.update(losses.mean(), targets.size(0))
        if token_bytes is not None:
            self.bpb.update(losses, targets, token_bytes, eos_id)

    def results(self, prefix: str, with_bpb: bool) -> dict[str, torch.Tensor]:
        """``{prefix}/loss`` and ``{prefix}/bpb``, reduced across ranks; the sums start again."""
        results = {f"{prefix}/loss": self.loss.compute()}
        if with_bpb:
            results[f"{prefix}/bpb"] = self.bpb.compute()
        self.loss.reset()
        self.bpb.reset()
        return results
