"""Scoring multiple-choice questions as lm-evaluation-harness's Hugging Face backend does, batched on the device.

Each (context, continuation) pair is tokenized as that backend tokenizes it: the context's trailing whitespace
moves to the continuation, context and continuation are encoded together, and the continuation is what the
whole encoding holds beyond the context's own; the sequence is cut from the left to the model's context.
A choice's score is the summed log-likelihood of its continuation tokens; ``acc`` takes the highest, and
``acc_norm`` the highest per character of the choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from pretrain.errors import UserError
from pretrain.evals.tasks import Question

IGNORED = -100  # the target of a position that is not part of a continuation


@dataclass(frozen=True)
class Row:
    """One choice of one question, ready for the model: ``inputs`` predict, at their last ``targets`` positions,
    the continuation's tokens ``targets``."""

    question: int
    choice: int
    inputs: list[int]
    targets: list[int]


def encode_pairs(tokenizer: Tokenizer, pairs: list[tuple[str, str]], prefix_id: int) -> list[tuple[list, list]]:
    """(context ids, continuation ids) for each (context, continuation), as lm-evaluation-harness splits them.

    An empty context is the prefix token (lm-evaluation-harness's beginning-of-text, which an exported folder
    sets to end-of-text), unless the continuation itself starts with it."""
    moved = []
    for context, continuation in pairs:
        kept = context.rstrip()
        moved.append((kept, context[len(kept) :] + continuation))
    wholes = tokenizer.encode_batch_fast([c + d for c, d in moved], add_special_tokens=False)
    heads = tokenizer.encode_batch_fast([c for c, _ in moved], add_special_tokens=False)
    encoded = []
    for (context, continuation), whole, head in zip(moved, wholes, heads, strict=True):
        if context:
            encoded.append((head.ids, whole.ids[len(head.ids) :]))
            continue
        ids = tokenizer.encode(continuation, add_special_tokens=False).ids
        encoded.append(([prefix_id], ids) if ids[:1] != [prefix_id] else (ids[:1], ids[1:]))
    return encoded


def scoring_rows(questions: list[Question], tokenizer: Tokenizer, max_length: int, prefix_id: int,
                 source: str = "task") -> list[Row]:  # fmt: skip
    """Every choice of ``questions`` (read from ``source``) as model rows, at most ``max_length`` tokens each,
    longest first (little padding in a batch)."""
    pairs = [(q.context, c) for q in questions for c in q.continuations]
    encoded = iter(encode_pairs(tokenizer, pairs, prefix_id))
    rows = []
    for number, question in enumerate(questions):
        for choice in range(len(question.continuations)):
            context, continuation = next(encoded)
            if not 0 < len(continuation) <= max_length:
                raise UserError(
                    f"{source}, line {question.line}: choice {choice} is {len(continuation)} tokens as the "
                    f"continuation of its context; each must be 1 to {max_length} tokens (the model's seq_len)."
                )
            whole = (context + continuation)[-(max_length + 1) :]
            rows.append(Row(number, choice, whole[:-1], continuation))
    return sorted(rows, key=lambda row: -len(row.inputs))


def batch_tensors(rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs padded on the right (a causal model's earlier positions never see the padding) and targets that
    are ``IGNORED`` everywhere but under each continuation; made once, on the host."""
    width = max(len(row.inputs) for row in rows)
    inputs = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORED, dtype=torch.long)
    for index, row in enumerate(rows):
        end = len(row.inputs)
        inputs[index, :end] = torch.tensor(row.inputs)
        targets[index, end - len(row.targets) : end] = torch.tensor(row.targets)
    return inputs, targets


def continuation_loglikelihoods(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The summed log-probability of each row's continuation tokens, (B,), in fp32."""
    losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORED, reduction="none")
    return -losses.view_as(targets).sum(dim=1)


def count_correct(scores: torch.Tensor, lengths: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """``[acc, acc_norm]`` counts over questions: ``scores`` (Q, C) with -inf where a question has fewer
    choices, ``lengths`` (Q, C) characters per choice, ``answers`` (Q,). Ties go to the first choice, as
    ``numpy.argmax`` gives them."""
    acc = (scores.argmax(dim=1) == answers).sum()
    acc_norm = ((scores.double() / lengths.double()).argmax(dim=1) == answers).sum()  # as numpy divides
    return torch.stack([acc, acc_norm])
