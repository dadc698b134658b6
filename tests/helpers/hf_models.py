"""Tiny random models saved by ``transformers``, as a team's starting point would be (tests that use them skip
where ``transformers`` is not installed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 320  # the test corpus's tokenizer (tests.helpers.runs.TINY_VOCAB) fits in it
SEQ_LEN = 64
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # below SEQ_LEN: the scaling changes the logits checked
}


# The shape both tiny models share: GQA (4 query heads over 2 key/value heads).
SHAPE = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


def save_llama(folder: Path, rope_scaling: dict | None = None) -> Path:
    """Llama 3's rotary scaling (by default one that matters at SEQ_LEN), an untied head."""
    rope = rope_scaling or LLAMA3_ROPE
    config = transformers.LlamaConfig(**SHAPE, tie_word_embeddings=False, rope_scaling=rope, rope_theta=500_000.0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def save_qwen3(folder: Path, **save_options) -> Path:
    """QK-norm, a head size of its own (32, not 64 / 4), a tied head."""
    config = transformers.Qwen3Config(**SHAPE, head_dim=32, tie_word_embeddings=True)
    torch.manual_seed(1)
    transformers.Qwen3ForCausalLM(config).save_pretrained(folder, **save_options)
    return folder
