"""Our model against ``transformers``' on the same Hugging Face folder, to the logit, before training from it.

A model that loads without an error can still compute something else (a rotary variant, a norm, a head
layout): its first loss is then far too high, or only a little. Both models score one fixed batch in fp32 on
the CPU; the largest logit difference and the mean KL divergence are printed, and a mismatch stops the run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.model.config import LlamaConfig
from pretrain.model.llama import build_model

log = logging.getLogger(__name__)
CHECK_TOKENS = 64  # per row, two rows
TOLERANCE = 1e-3  # of the logits' scale: fp32 on the CPU agrees to about 1e-5
ROPE_TOLERANCE = 1e-4  # relative, per frequency


@dataclass(frozen=True)
class LogitCheck:
    max_abs_diff: float
    mean_kl: float
    scale: float  # the largest |logit| of transformers' model
    # The rotary frequencies compared directly (largest relative difference): a long-context scaling changes
    # only the low frequencies, too little to show in the logits of a short batch. None: not exposed.
    rope_rel_diff: float | None = None

    @property
    def passed(self) -> bool:
        rope_ok = self.rope_rel_diff is None or self.rope_rel_diff <= ROPE_TOLERANCE
        return rope_ok and self.max_abs_diff <= TOLERANCE * max(1.0, self.scale)

    def __str__(self) -> str:
        rope = "" if self.rope_rel_diff is None else f", rotary frequencies within {self.rope_rel_diff:.1e}"
        logits = f"max |logit difference| {self.max_abs_diff:.2e} (of logits up to {self.scale:.1f})"
        return f"{logits}, KL {self.mean_kl:.2e}{rope}"


def check_against_transformers(folder: Path, config: LlamaConfig, weights: dict[str, torch.Tensor]) -> str | None:
    """Why our model on ``weights`` is not ``transformers``' model of ``folder`` (None: it is, or it cannot be
    checked here; each said in a log line)."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        log.info("transformers is not installed: the logits of %s were not checked (pip install -e '.[dev]').", folder)
        return None
    check = compare_logits(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), config, weights)
    if check.passed:
        log.info("Logits of %s match transformers': %s", folder, check)
        return None
    return (
        f"Our model on {folder} does not compute transformers' logits ({check}): some field of its config.json "
        "is read differently here. Nothing was trained."
    )


@torch.no_grad()
def compare_logits(reference: torch.nn.Module, config: LlamaConfig, weights: dict[str, torch.Tensor]) -> LogitCheck:
    """Both models' logits on one fixed batch of random token ids, in fp32 on the CPU."""
    ours = build_model(config, "cpu", seed=0, weights=weights).eval()  # loading casts to fp32
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (2, min(CHECK_TOKENS, config.seq_len)), generator=generator)
    expected = reference.float().eval()(ids).logits[..., : config.vocab_size]
    got = ours(ids)[..., : config.vocab_size]
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), expected.log_softmax(-1), log_target=True, reduction="none")
    return LogitCheck(
        max_abs_diff=float((got - expected).abs().max()),
        mean_kl=float(kl.sum(-1).mean()),
        scale=float(expected.abs().max()),
        rope_rel_diff=_rope_difference(reference, ours.rope),
    )


def _rope_difference(reference: torch.nn.Module, rope: torch.Tensor) -> float | None:
    """The largest relative difference between transformers' rotary frequencies and ours (the angle each
    frequency turns in one position)."""
    rotary = getattr(getattr(reference, "model", None), "rotary_emb", None)
    theirs = getattr(rotary, "inv_freq", None)
    if theirs is None or getattr(rotary, "attention_scaling", 1.0) != 1.0:
        return None
    ours = torch.atan2(rope[1, :, 1], rope[1, :, 0])  # position 1: the angle is the frequency itself
    return float(((ours - theirs.float()) / theirs.float()).abs().max())
