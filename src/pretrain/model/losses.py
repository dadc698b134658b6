"""The model's next-token loss: cross-entropy in fp32, with PaLM's z-loss term beside it when asked for."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from pretrain.model.document_mask import AttentionMask
from pretrain.model.llama import Llama


class LossTerms(NamedTuple):
    """What a loss computation gives: the cross-entropy (its mean, or each target's with ``per_token``) and
    the z-loss term (None unless asked for)."""

    ce: torch.Tensor
    z: torch.Tensor | None


LogitsLoss = Callable[[torch.Tensor, torch.Tensor, bool, bool], LossTerms]


def next_token_loss(
    model: Llama,
    batch: torch.Tensor,
    mask: AttentionMask | None = None,
    z_loss: bool = False,
    per_token: bool = False,
    logits_loss: LogitsLoss | None = None,
) -> LossTerms:
    """The loss of predicting ``batch[:, 1:]`` from ``batch[:, :-1]``, under ``mask`` (causal if None).

    A function of its own so that ``torch.compile`` can take the model and the loss as one graph. Where the
    model is compiled in pieces (FSDP2), pass ``logits_loss``: a compiled ``loss_of_logits``. ``per_token``
    gives each target's cross-entropy, (B, T): held-out text is scored token by token (bits per byte leave
    the end-of-text targets out).
    """
    batch = batch.long()  # shards store the smallest dtype that holds the vocabulary
    logits = model(batch[:, :-1], mask=mask)  # (B, T, V)
    return (logits_loss or loss_of_logits)(logits, batch[:, 1:], z_loss, per_token)


def loss_of_logits(
    logits: torch.Tensor, targets: torch.Tensor, z_loss: bool = False, per_token: bool = False
) -> LossTerms:
    """Cross-entropy in fp32 (compiled, the upcast fuses into the softmax instead of filling memory with an
    fp32 copy of the logits, forward and backward), and with ``z_loss`` the mean squared log of the softmax's
    normaliser, which pulls that normaliser towards 1 so the logits do not drift: one log-sum-exp serves both."""
    flat = logits.flatten(0, 1).float()
    if not z_loss:
        ce = F.cross_entropy(flat, targets.flatten(), reduction="none" if per_token else "mean")
        return LossTerms(ce.view_as(targets) if per_token else ce, None)
    normalisers = torch.logsumexp(flat, dim=-1)
    target_logits = flat.gather(1, targets.flatten().unsqueeze(1)).squeeze(1)
    ce = normalisers - target_logits
    return LossTerms(ce.view_as(targets) if per_token else ce.mean(), normalisers.square().mean())
