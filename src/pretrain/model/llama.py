"""A Llama-style decoder-only language model in plain PyTorch.

RMSNorm, rotary position embeddings, grouped-query attention through
``F.scaled_dot_product_attention``, SwiGLU MLP, no biases. Nothing here knows about Lightning,
FSDP or the data pipeline, so the model can be tested, exported and reused on its own.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils.checkpoint import checkpoint

from pretrain.model.config import LlamaConfig
from pretrain.model.document_mask import AttentionMask

# Kernels behind F.scaled_dot_product_attention, by the names configs use. After the chosen one, the
# others are tried in this order (PyTorch's own on H100/H200 with a recent cuDNN): math, the slow
# one that always runs, comes last.
ATTENTION_KERNELS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


@functools.cache
def compiled_flex_attention() -> Callable[..., torch.Tensor]:
    """FlexAttention runs as a fused kernel only compiled (eagerly it materialises every score); inside a compiled
    model this compiles with it. Made on first use on CUDA, so importing the model compiles nothing."""
    return torch.compile(flex_attention)


def rope_cache(
    seq_len: int,
    head_dim: int,
    base: float,
    device: torch.device | None = None,
    llama3_scaling: tuple[float, float, float, int] | None = None,
) -> torch.Tensor:
    """Cos and sin of every (position, frequency) pair, shape (T, head_dim // 2, 2), float32; with
    ``llama3_scaling`` (``LlamaConfig.rope_scaling``), the frequencies Llama 3 uses for long contexts."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if llama3_scaling is not None:
        inv_freq = llama3_frequencies(inv_freq, *llama3_scaling)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def llama3_frequencies(
    inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float, original_context: int
) -> torch.Tensor:
    """Llama 3's rotary frequencies: those whose wavelength is short against the original context stay, long
    ones are divided by ``factor``, and those in between are blended linearly in context / wavelength."""
    wavelength = 2 * math.pi / inv_freq
    ratio = original_context / wavelength  # how many wavelengths fit in the original context
    blend = ((ratio - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0.0, 1.0)
    return inv_freq / factor * (1 - blend) + inv_freq * blend


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[i], x[i + D/2]) by its position's angle; x is (B, H, T, D), rope (T, D/2, 2) or, where
    each row has its own positions, (B, T, D/2, 2).

    The half-split pairing is Llama's (Hugging Face's ``rotate_half``), so exported weights need
    no permutation.
    """
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, H, T, D/2) each
    cos, sin = rope[..., 0], rope[..., 1]  # (T, D/2), or (B, T, D/2) for positions of each row
    if rope.ndim == 4:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D/2): the same for every head
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


class LayerCache:
    """Keys and values (B, KV, T, D) of the tokens one attention layer has seen, for incremental decoding."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.size(2)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.k, self.v = k, v
        return k, v


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


class Attention(nn.Module):
    """Causal self-attention, or attention under a given mask; ``n_kv_head < n_head`` shares each key/value
    head among a group."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        qkv_dim = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.qkv = nn.Linear(config.d_model, qkv_dim, bias=False)
        self.proj = nn.Linear(config.attention_dim, config.d_model, bias=False)
        self.qk_norm = config.qk_norm  # bounds the attention logits: against loss spikes, less LR sensitivity
        if self.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps)
        self.kernel_order: list[SDPBackend] | None = None  # None: PyTorch picks; see Llama.use_attention_kernel

    def forward(
        self, x: torch.Tensor, rope: torch.Tensor, cache: LayerCache | None = None, mask: AttentionMask | None = None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.qkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        past = 0 if cache is None else len(cache)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, KV, past + T, D)
        gqa = self.n_kv_head != self.n_head
        if isinstance(mask, BlockMask):  # document masking on CUDA: only the blocks the mask keeps are computed
            attend = compiled_flex_attention() if x.is_cuda else flex_attention
            # Contiguous: compiled, inductor may otherwise hand the kernel a layout it reads wrongly (measured on
            # CPU: logits off by 0.1 with rotated queries and keys; tests/model/test_document_mask.py).
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            y = attend(q, k, v, block_mask=mask, enable_gqa=gqa)  # (B, H, T, D)
            return self.proj(y.transpose(1, 2).reshape(B, T, q_dim))
        if past:  # new tokens see every cached token and, among themselves, only earlier ones
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
        # Chosen here, inside the block, so a checkpointed block recomputes with the same kernel.
        with sdpa_kernel(self.kernel_order, set_priority=True) if self.kernel_order else nullcontext():
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa
            )  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(B, T, q_dim))


class SwiGLU(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(config.d_model, config.ffn_dim, bias=False)
        self.up = nn.Linear(config.d_model, config.ffn_dim, bias=False)
        self.down = nn.Linear(config.ffn_dim, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(
        self, x: torch.Tensor, rope: torch.Tensor, cache: LayerCache | None = None, mask: AttentionMask | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, cache, mask)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        self.tie_weights()
        # Derived from the config, so kept out of the state dict; rebuilt by init_weights.
        rope = rope_cache(config.seq_len, config.head_dim, config.rope_base, llama3_scaling=config.rope_scaling)
        self.register_buffer("rope", rope, persistent=False)
        # Recompute each block in the backward pass instead of keeping its activations: about a third
        # more compute for a fraction of the memory. A training choice, not architecture: not in the config.
        self.activation_checkpointing = False

    def forward(
        self,
        idx: torch.Tensor,
        cache: list[LayerCache] | None = None,
        mask: AttentionMask | None = None,
        positions: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids (B, T) -> next-token logits (B, T, padded_vocab_size).

        With ``cache`` (from ``new_cache()``), ``idx`` continues the tokens seen so far. ``mask``
        (``pretrain.model.document_mask``, or any (B, 1, T, T) booleans) replaces causal attention, e.g. to keep
        packed documents apart. ``positions`` (B, T), each below ``seq_len``, replace 0..T-1 in the rotary
        embedding: with a mask, several sequences that share a prefix can share a row. ``logits_at``, indices
        into the B * T positions (repeats allowed), returns only their logits, (N, padded_vocab_size): scoring
        a few tokens of each row then skips most of the LM head.
        """
        if cache is not None and mask is not None:
            raise ValueError("An attention mask applies to a whole block, not to incremental decoding with a cache.")
        start = 0 if cache is None else len(cache[0])
        if positions is None and start + idx.size(1) > self.config.seq_len:
            raise ValueError(f"{start + idx.size(1)} tokens exceed seq_len={self.config.seq_len}")
        rope = self.rope[start : start + idx.size(1)] if positions is None else self.rope[positions]
        x = self.embed(idx)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            if self.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, rope, None, mask, use_reentrant=False)
            else:
                x = block(x, rope, None if cache is None else cache[i], mask)
        if logits_at is not None:
            x = x.flatten(0, 1)[logits_at]  # (N, C)
        return self.lm_head(self.norm(x))  # (B, T, V) or (N, V)

    def use_attention_kernel(self, name: str | None) -> None:
        """Try this attention kernel first (a key of ``ATTENTION_KERNELS``), the others in that
        dict's order where it cannot run (e.g. ``cudnn`` on a CPU); None leaves the choice to PyTorch.

        A speed choice, not architecture: the kernels compute the same attention, so it is not
        in the config and not saved with the weights.
        """
        if name is not None and name not in ATTENTION_KERNELS:
            raise ValueError(f"Unknown attention kernel {name!r}; choose one of {sorted(ATTENTION_KERNELS)}.")
        order = None
        if name is not None:
            order = [ATTENTION_KERNELS[name]] + [kernel for other, kernel in ATTENTION_KERNELS.items() if other != name]
        for block in self.blocks:
            block.attn.kernel_order = order

    def new_cache(self) -> list[LayerCache]:
        return [LayerCache() for _ in self.blocks]

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic initialisation from ``seed`` alone, whatever the device or RNG state.

        Linear and embedding weights ~ N(0, 0.02); the projections that write into the residual
        stream get 0.02 / sqrt(2 * n_layer) so the residual's variance does not grow with depth.
        Values are drawn on the CPU in parameter order, so every device and strategy gets the
        same weights; a sharded parameter (FSDP2's DTensor) keeps its slice of the full draw.
        """
        self.tie_weights()  # ``to_empty`` after a meta-device build unties them
        generator = torch.Generator().manual_seed(seed)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            std = residual_std if name.endswith(("attn.proj.weight", "mlp.down.weight")) else 0.02
            value = torch.empty(param.shape, device="cpu").normal_(0.0, std, generator=generator)
            if isinstance(param, DTensor):
                value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
            param.copy_(value)
        self.init_rope()

    def tie_weights(self) -> None:
        """With ``tie_embeddings``, make the LM head share the embedding's tensor. The one place that ties:
        moving a model off the meta device or loading weights with ``assign=True`` unties them."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def init_rope(self) -> None:
        """(Re)compute the rotary table on the embedding's device, e.g. after building on the meta device."""
        config = self.config
        self.rope = rope_cache(
            config.seq_len, config.head_dim, config.rope_base, self.embed.weight.device, config.rope_scaling
        )


def build_model(
    config: LlamaConfig, device: torch.device | str, seed: int, weights: dict[str, torch.Tensor] | None = None
) -> Llama:
    """The model on ``device``, initialised from ``seed`` (or given ``weights``), built on the meta device
    first so no memory goes to a throw-away default initialisation."""
    with torch.device("meta"):
        model = Llama(config)
    model.to_empty(device=device)
    model.init_weights(seed)
    if weights is not None:
        model.load_state_dict(weights)
    return model
