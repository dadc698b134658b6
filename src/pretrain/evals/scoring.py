"""Scoring multiple-choice questions as lm-evaluation-harness's Hugging Face backend does, batched on the device.

Each (context, continuation) pair is tokenized as that backend tokenizes it: the context's trailing whitespace
moves to the continuation, context and continuation are encoded together, and the continuation is what the
whole encoding holds beyond the context's own; the sequence is cut from the left to the model's context.
A choice's score is the summed log-likelihood of its continuation tokens; ``acc`` takes the highest, and
``acc_norm`` the highest per character of the choice.

Where that backend runs each choice as its own sequence, the choices of a question share one row here: the
context once, then each continuation on a branch that attends to the context and to itself only, with the
positions it would have alone. The logits are those of separate sequences (tested against the backend), for
the cost of the context once instead of once per choice, and only the scored positions reach the LM head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from pretrain.errors import UserError
from pretrain.evals.tasks import Question

PADDING = -1  # the branch of a padding token


@dataclass(frozen=True)
class Row:
    """One row of a forward pass: a question's context and, each on its own branch, its choices' continuations
    (or one choice alone, where its context had to be cut to fit), and the logits it is scored on.

    ``branches``: 0 for the context, ``choice + 1`` for a continuation's tokens; a token attends to the earlier
    context tokens and the earlier tokens of its own branch. ``positions``: each token's place in the sequence
    it belongs to (context, then its continuation). ``scored``: (choice, index, target), the logits at
    ``index`` predicting ``target``, one token of that choice's continuation.
    """

    question: int
    tokens: list[int]
    positions: list[int]
    branches: list[int]
    scored: list[tuple[int, int, int]]


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


def shared_row(question: int, context: list[int], continuations: list[list[int]]) -> Row:
    """The context once, then each continuation but its last token (which nothing is predicted from)."""
    tokens, positions, branches = list(context), list(range(len(context))), [0] * len(context)
    scored = []
    for choice, continuation in enumerate(continuations):
        scored.append((choice, len(context) - 1, continuation[0]))  # the context's last logits, for every choice
        for offset, target in enumerate(continuation[1:]):
            scored.append((choice, len(tokens) + offset, target))
        tokens += continuation[:-1]
        positions += range(len(context), len(context) + len(continuation) - 1)
        branches += [choice + 1] * (len(continuation) - 1)
    return Row(question, tokens, positions, branches, scored)


def single_row(question: int, choice: int, context: list[int], continuation: list[int], max_length: int) -> Row:
    """One choice alone, its context cut from the left to ``max_length`` tokens in all."""
    inputs = (context + continuation)[-(max_length + 1) :][:-1]
    first = len(inputs) - len(continuation)  # the index whose logits predict the continuation's first token
    scored = [(choice, first + offset, target) for offset, target in enumerate(continuation)]
    return Row(question, inputs, list(range(len(inputs))), [0] * len(inputs), scored)


def scoring_rows(
    questions: list[Question], tokenizer: Tokenizer, max_length: int, prefix_id: int, source: str = "task"
) -> list[Row]:
    """Every choice of ``questions`` (read from ``source``) in model rows, each choice's sequence at most
    ``max_length`` tokens, longest rows first (little padding in a batch)."""
    pairs = [(q.context, c) for q in questions for c in q.continuations]
    encoded = iter(encode_pairs(tokenizer, pairs, prefix_id))
    rows = []
    for number, question in enumerate(questions):
        split = [next(encoded) for _ in question.continuations]
        for choice, (_, continuation) in enumerate(split):
            if not 0 < len(continuation) <= max_length:
                raise UserError(
                    f"{source}, line {question.line}: choice {choice} is {len(continuation)} tokens as the "
                    f"continuation of its context; each must be 1 to {max_length} tokens (the model's seq_len)."
                )
        context = split[0][0]
        if all(c == context and len(c) + len(d) <= max_length + 1 for c, d in split):
            rows.append(shared_row(number, context, [d for _, d in split]))
        else:
            rows += [single_row(number, choice, c, d, max_length) for choice, (c, d) in enumerate(split)]
    return sorted(rows, key=lambda row: -len(row.tokens))


@dataclass
class Batch:
    """Rows of one forward pass as tensors: token ids (B, W) padded on the right; their positions and branches
    (None where every row is a plain sequence); for each scored token, the flat index of its logits in the
    B * W positions, its target, and the (question, choice) it counts for."""

    tokens: torch.Tensor
    positions: torch.Tensor | None
    branches: torch.Tensor | None
    picks: torch.Tensor
    targets: torch.Tensor
    places: torch.Tensor

    def apply(self, change: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        """The batch with ``change`` (a copy to the device, pinning) applied to each of its tensors."""
        values = (getattr(self, field.name) for field in fields(self))
        return Batch(*(None if value is None else change(value) for value in values))


def batch_of(rows: list[Row]) -> Batch:
    """``rows`` as a ``Batch``, made on the host."""
    width = max(len(row.tokens) for row in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    branches = torch.full((len(rows), width), PADDING, dtype=torch.long)
    picks, targets, places = [], [], []
    for index, row in enumerate(rows):
        tokens[index, : len(row.tokens)] = torch.tensor(row.tokens)
        positions[index, : len(row.tokens)] = torch.tensor(row.positions)
        branches[index, : len(row.tokens)] = torch.tensor(row.branches)
        for choice, at, target in row.scored:
            picks.append(index * width + at)
            targets.append(target)
            places.append((row.question, choice))
    shared = any(max(row.branches) > 0 for row in rows)
    return Batch(
        tokens,
        positions if shared else None,
        branches if shared else None,
        torch.tensor(picks),
        torch.tensor(targets),
        torch.tensor(places),
    )


def branch_mask(branches: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) booleans: each token attends to itself, the earlier context tokens and the earlier tokens of
    its branch (padding, to the context and earlier padding: no row attends to nothing)."""
    earlier = torch.ones(branches.size(1), branches.size(1), dtype=torch.bool, device=branches.device).tril()
    same_branch = branches[:, :, None] == branches[:, None, :]
    return (earlier & (same_branch | (branches[:, None, :] == 0))).unsqueeze(1)


def token_loglikelihoods(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The log-probability, in fp32, of each scored token of ``batch`` (on the model's device)."""
    mask = None if batch.branches is None else branch_mask(batch.branches)
    logits = model(batch.tokens, mask=mask, positions=batch.positions, logits_at=batch.picks)  # (N, V)
    return -F.cross_entropy(logits.float(), batch.targets, reduction="none")


def choice_scores(token_scores: torch.Tensor, places: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``scores`` (Q, C) plus each token's log-probability added to its (question, choice)'s, in place."""
    return scores.index_put_((places[:, 0], places[:, 1]), token_scores, accumulate=True)


def count_correct(scores: torch.Tensor, lengths: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """``[acc, acc_norm]`` counts over questions: ``scores`` (Q, C) with -inf where a question has fewer
    choices, ``lengths`` (Q, C) characters per choice, ``answers`` (Q,). Ties go to the first choice, as
    ``numpy.argmax`` gives them."""
    acc = (scores.argmax(dim=1) == answers).sum()
    acc_norm = ((scores.double() / lengths.double()).argmax(dim=1) == answers).sum()  # as numpy divides
    return torch.stack([acc, acc_norm])
