"""Continue a prompt with a trained model: ``python -m pretrain.generate CKPT --prompt "def main("``.

Reads a Lightning checkpoint (one file, or the folder of a sharded FSDP checkpoint); the tokenizer
travels inside it. Greedy at temperature 0; otherwise samples from the top-k tokens.
"""

from __future__ import annotations

import torch
from jsonargparse import auto_cli
from tokenizers import Tokenizer

from pretrain.data.tokenizer import eos_id
from pretrain.errors import UserError, run_command
from pretrain.loading import load_checkpoint, load_model, load_tokenizer_from_checkpoint
from pretrain.model import Llama


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


@torch.no_grad()
def generate(
    model: Llama,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    stop_id: int | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Token ids that continue ``prompt``, decoded incrementally with a KV cache.

    Stops after ``max_new_tokens``, at ``stop_id``, or when the context (``seq_len``) is full.
    """
    if not prompt:
        raise UserError("The prompt encodes to no tokens.")
    room = model.config.seq_len - len(prompt)
    if room <= 0:
        raise UserError(f"The prompt has {len(prompt)} tokens; the model reads at most {model.config.seq_len}.")
    device = model.embed.weight.device
    cache = model.new_cache()
    logits = model(torch.tensor([prompt], device=device), cache)[0, -1]
    new: list[int] = []
    for _ in range(min(max_new_tokens, room)):
        token = sample_next(logits[: model.config.vocab_size], temperature, top_k, generator)
        new.append(token)
        if token == stop_id or len(new) == room:
            break
        logits = model(torch.tensor([[token]], device=device), cache)[0, -1]
    return new


def continue_text(
    model: Llama,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> str:
    """The text the model writes after ``prompt`` (an empty prompt starts a new document)."""
    eos = eos_id(tokenizer)
    tokenizer.encode_special_tokens = True  # as in training: special-token strings in a prompt are text
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids if prompt else [eos]
    new = generate(model, ids, max_new_tokens, temperature, top_k, stop_id=eos, generator=generator)
    return tokenizer.decode([t for t in new if t != eos], skip_special_tokens=False)


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
    print(prompt + continue_text(model, tokenizer, prompt, max_new_tokens, temperature, top_k))


def main(argv: list[str] | None = None) -> None:
    """``pretrain generate CHECKPOINT --prompt ...``."""
    auto_cli(print_continuation, args=argv, as_positional=True, prog="pretrain generate")


if __name__ == "__main__":
    run_command(main)
