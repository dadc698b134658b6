"""Continue a prompt with a trained model: ``python -m pretrain.commands.generate CKPT --prompt "def main("``.

Reads a Lightning checkpoint (one file, or the folder of a sharded FSDP checkpoint); the tokenizer
travels inside it. Greedy at temperature 0; otherwise samples from the top-k tokens.
"""

from __future__ import annotations

import torch
from jsonargparse import auto_cli
from tokenizers import Tokenizer

from pretrain.checkpointing.loading import (
    checkpoint_bounds,
    load_checkpoint,
    load_model,
    load_tokenizer_from_checkpoint,
)
from pretrain.data.prepare.tokenizer import DocumentBounds
from pretrain.errors import UserError, run_command
from pretrain.model.llama import Llama


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None = None
) -> int:
    """One token id from next-token logits (V,): the argmax at temperature 0, else a top-k sample."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k:
        threshold = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    probabilities = logits.softmax(-1)
    if not torch.isfinite(probabilities).all():  # a diverged model's: no distribution to draw from
        return int(logits.nan_to_num(nan=float("-inf")).argmax())
    return int(torch.multinomial(probabilities, 1, generator=generator))


def generate(
    model: Llama,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    stop_id: int | None = None,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
) -> list[int]:
    """Token ids that continue ``prompt``, decoded incrementally with a KV cache.

    Stops after ``max_new_tokens``, at ``stop_id``, or when the context (``seq_len``) is full. ``vocab_size``: the
    tokenizer's, where the model's rows run past it (a public model's padding): those ids are never drawn.
    """
    return generate_rows(model, [prompt], max_new_tokens, [temperature], top_k, stop_id, generator, vocab_size)[0]


@torch.no_grad()
def generate_rows(
    model: Llama,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperatures: list[float],
    top_k: int | None = None,
    stop_id: int | None = None,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
) -> list[list[int]]:
    """``generate`` for prompts of one length, each at its own temperature, decoded together: one forward pass
    per token for all of them, where a small model's pass costs its calls' overhead more than its arithmetic.
    A row that reaches ``stop_id`` stops there; the others go on."""
    if not prompts[0]:
        raise UserError("The prompt encodes to no tokens.")
    if len({len(prompt) for prompt in prompts}) != 1:
        raise ValueError("generate_rows decodes prompts of one length together; group them by length.")
    room = model.config.seq_len - len(prompts[0])
    if room <= 0:
        raise UserError(f"The prompt has {len(prompts[0])} tokens; the model reads at most {model.config.seq_len}.")
    device = model.embed.weight.device
    cache = model.new_cache()
    logits = model(torch.tensor(prompts, device=device), cache)[:, -1]  # (rows, V)
    new: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * len(prompts)
    steps = min(max_new_tokens, room)
    vocab_size = min(vocab_size or model.config.vocab_size, model.config.vocab_size)
    for step in range(steps):
        tokens = [
            stop_id if done else sample_next(row_logits[:vocab_size], temperature, top_k, generator)
            for row_logits, temperature, done in zip(logits, temperatures, stopped, strict=True)
        ]
        for row, token in enumerate(tokens):
            if not stopped[row]:
                new[row].append(token)
                stopped[row] = token == stop_id
        if all(stopped) or step == steps - 1:
            break
        logits = model(torch.tensor([[token] for token in tokens], device=device), cache)[:, -1]
    return new


def generate_each(
    model: Llama,
    requests: list[tuple[list[int], float, int]],
    top_k: int | None = None,
    stop_id: int | None = None,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
) -> list[list[int]]:
    """The continuation of each (prompt, temperature, max_new_tokens), those whose prompts have one length
    decoded together (``generate_rows``)."""
    by_length: dict[int, list[int]] = {}
    for index, (prompt, _, _) in enumerate(requests):
        by_length.setdefault(len(prompt), []).append(index)
    results: list[list[int]] = [[] for _ in requests]
    for indices in by_length.values():
        longest = max(requests[index][2] for index in indices)
        temperatures = [requests[index][1] for index in indices]
        rows = generate_rows(
            model,
            [requests[index][0] for index in indices],
            longest,
            temperatures,
            top_k,
            stop_id,
            generator,
            vocab_size,
        )
        for index, row in zip(indices, rows, strict=True):
            results[index] = row[: requests[index][2]]
    return results


def prompt_ids(tokenizer: Tokenizer, prompt: str, bounds: DocumentBounds) -> list[int]:
    """``prompt``'s token ids as in training (special-token strings are text), as a document begins: after the
    token training put before each one, if any. An empty prompt starts a new document (with that token, else the
    end-of-text token that ends the one before)."""
    tokenizer.encode_special_tokens = True
    text = tokenizer.encode(prompt, add_special_tokens=False).ids if prompt else []
    if bounds.bos is not None:
        return [bounds.bos, *text]
    return text or [bounds.eos]


def continuation_text(tokenizer: Tokenizer, ids: list[int], eos: int) -> str:
    """The text of generated ``ids``, the end-of-text token ``eos`` left out."""
    return tokenizer.decode([t for t in ids if t != eos], skip_special_tokens=False)


def continue_text(
    model: Llama,
    tokenizer: Tokenizer,
    bounds: DocumentBounds,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> str:
    """The text the model writes after ``prompt`` (an empty prompt starts a new document), until end-of-text."""
    ids = prompt_ids(tokenizer, prompt, bounds)
    written = generate(
        model, ids, max_new_tokens, temperature, top_k, bounds.eos, generator, tokenizer.get_vocab_size()
    )
    return continuation_text(tokenizer, written, bounds.eos)


def print_continuation(
    checkpoint: str,
    prompt: str = "",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 50,
    device: str = "cpu",
    seed: int = 0,
) -> None:
    """Print the prompt and the model's continuation.

    Args:
        checkpoint: A .ckpt file or a sharded checkpoint folder written by training.
        prompt: Text to continue; empty starts a new document.
        max_new_tokens: Most tokens to generate.
        temperature: 0 picks the most likely token every time; higher is more varied.
        top_k: Sample only among the k most likely tokens (null: all).
        device: cpu, cuda, cuda:1 ...
        seed: Seed of the sampling.
    """
    torch.manual_seed(seed)
    loaded = load_checkpoint(checkpoint)
    model = load_model(loaded).to(device)
    tokenizer = load_tokenizer_from_checkpoint(loaded)
    bounds = checkpoint_bounds(loaded, tokenizer)
    print(prompt + continue_text(model, tokenizer, bounds, prompt, max_new_tokens, temperature, top_k))


def main(argv: list[str] | None = None) -> None:
    """``pretrain generate CHECKPOINT --prompt ...``."""
    auto_cli(print_continuation, args=argv, as_positional=True, prog="pretrain generate")


if __name__ == "__main__":
    run_command(main)
