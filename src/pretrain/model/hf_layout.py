"""Our parameter names and Hugging Face Llama's (Qwen3's with QK-norm), both ways: for export, and for reading an
exported folder back."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from pretrain.model.config import LlamaConfig

# Our parameter names -> Hugging Face Llama's, per block and for the rest.
BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}
QK_NORM_NAMES = {  # with qk_norm: Qwen3's per-head query and key norms
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
}
TOP_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def to_hf_state_dict(state: dict[str, torch.Tensor], config: LlamaConfig) -> dict[str, torch.Tensor]:
    """Rename to Llama's layout; the fused qkv projection is split into q_proj, k_proj, v_proj."""
    q_dim, kv_dim = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    out = {}
    for name, tensor in state.items():
        if name in TOP_NAMES:
            if name == "lm_head.weight" and config.tie_embeddings:
                continue  # tied: transformers re-ties it to the embedding
            out[TOP_NAMES[name]] = tensor
            continue
        _, index, rest = name.split(".", 2)  # blocks.<i>.<rest>
        prefix = f"model.layers.{index}."
        if rest == "attn.qkv.weight":
            q, k, v = tensor.split([q_dim, kv_dim, kv_dim])
            out |= {prefix + "self_attn.q_proj.weight": q, prefix + "self_attn.k_proj.weight": k}
            out[prefix + "self_attn.v_proj.weight"] = v
        else:
            out[prefix + {**BLOCK_NAMES, **QK_NORM_NAMES}[rest]] = tensor
    return {name: tensor.contiguous().clone() for name, tensor in out.items()}


def from_hf_state_dict(hf: dict[str, torch.Tensor], config: LlamaConfig) -> dict[str, torch.Tensor]:
    """The inverse of ``to_hf_state_dict``: an exported folder's weights under our names."""
    out = {ours: hf[theirs] for ours, theirs in TOP_NAMES.items() if theirs in hf}
    if config.tie_embeddings or "lm_head.weight" not in hf:
        out["lm_head.weight"] = out["embed.weight"]
    for i in range(config.n_layer):
        prefix = f"model.layers.{i}."
        qkv = [hf[f"{prefix}self_attn.{p}_proj.weight"] for p in "qkv"]
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat(qkv)
        names = {**BLOCK_NAMES, **QK_NORM_NAMES} if config.qk_norm else BLOCK_NAMES
        out |= {f"blocks.{i}.{ours}": hf[prefix + theirs] for ours, theirs in names.items()}
    return out


def load_exported_weights(folder: str | Path, config: LlamaConfig) -> dict[str, torch.Tensor]:
    """Our-named weights from a folder ``pretrain export`` wrote (for continued pretraining)."""
    return from_hf_state_dict(load_file(str(Path(folder) / "model.safetensors")), config)
