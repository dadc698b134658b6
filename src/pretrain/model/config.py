"""The numbers that define the architecture: ``LlamaConfig`` and its named presets."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class LlamaConfig:
    """Every number that defines the architecture. The model is built from this alone."""

    vocab_size: int = 4096
    seq_len: int = 256
    d_model: int = 192
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4
    ffn_dim: int = 512
    rope_base: float = 10_000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qk_norm: bool = False  # RMSNorm of each head's queries and keys before rotary (OLMo 2, Qwen3)
    padding_multiple: int = 64
    attention_head_dim: int | None = None  # None: d_model // n_head; set where a model differs (Qwen3: 128)
    # Llama 3's rotary frequencies for long contexts (rope_type llama3); factor 1.0: plain rotary.
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192

    def __post_init__(self) -> None:
        if self.attention_head_dim is None and self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rope_factor != 1.0 and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ValueError("rope_high_freq_factor must be above rope_low_freq_factor")

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.d_model // self.n_head

    @property
    def rope_scaling(self) -> tuple[float, float, float, int] | None:
        """Llama 3's rotary scaling (factor, low and high frequency factors, original context), if any."""
        if self.rope_factor == 1.0:
            return None
        return (self.rope_factor, self.rope_low_freq_factor, self.rope_high_freq_factor, self.rope_original_context)

    @property
    def attention_dim(self) -> int:
        """The width of the queries of all heads together (d_model, unless the heads say otherwise)."""
        return self.n_head * self.head_dim

    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows, rounded up so the LM head's matmul has GPU-friendly shapes."""
        return math.ceil(self.vocab_size / self.padding_multiple) * self.padding_multiple

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> LlamaConfig:
        """A named preset with some fields replaced, e.g. ``from_preset("tiny", n_layer=6)``."""
        if name not in PRESETS:
            raise ValueError(f"Unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"Unknown model field(s) {unknown}; valid fields are {sorted(known)}")
        return replace(PRESETS[name], **overrides)


PRESETS: dict[str, LlamaConfig] = {
    # Sized for a 2-core laptop: the quickstart trains it in a few minutes.
    "tiny": LlamaConfig(vocab_size=4096, seq_len=256, d_model=192, n_layer=4, n_head=4, n_kv_head=4, ffn_dim=512),
    # GPT-2 small's shape with Llama's blocks: 124M parameters with GPT-2's vocabulary, tied.
    "gpt2-124m": LlamaConfig(
        vocab_size=50257,
        seq_len=1024,
        d_model=768,
        n_layer=12,
        n_head=12,
        n_kv_head=12,
        ffn_dim=2048,
        tie_embeddings=True,
    ),
    # TinyLlama 1.1B's shape.
    "llama-1b": LlamaConfig(
        vocab_size=32000, seq_len=2048, d_model=2048, n_layer=22, n_head=32, n_kv_head=4, ffn_dim=5632
    ),
}
