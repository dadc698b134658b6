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


@dataclass(frozen=True)
class LogitCheck:
    max_abs_diff: float
    mean_kl: float
    scale: float  # the largest |logit| of transformers' model

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= TOLERANCE * max(1.0, self.scale)

    def __str__(self) -> str:
        return (
            f"max |logit difference| {self.max_abs_diff:.2e} (of logits up to {self.scale:.1f}), KL {self.mean_kl:.2e}"
        )


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
    ours = build_model(config, "cpu", seed=0, weights={name: w.float() for name, w in weights.items()}).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (2, min(CHECK_TOKENS, config.seq_len)), generator=generator)
    expected = reference.float().eval()(ids).logits[..., : config.vocab_size]
    got = ours(ids)[..., : config.vocab_size]
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), expected.log_softmax(-1), log_target=True, reduction="none")
    return LogitCheck(
        max_abs_diff=float((got - expected).abs().max()),
        mean_kl=float(kl.sum(-1).mean()),
        scale=float(expected.abs().max()),
    )
