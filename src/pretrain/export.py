"""Export a checkpoint as a Hugging Face Llama folder: ``python -m pretrain.export CKPT OUT_DIR``.

The folder loads with ``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` and
``AutoTokenizer.from_pretrained(OUT_DIR)``: safetensors weights, config.json, tokenizer files.
Post-training tools (fine-tuning, instruction tuning, RLHF) read it as they read any Llama.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pretrain.errors import UserError
from pretrain.loading import load_checkpoint, load_tokenizer_from_checkpoint, model_config, model_state_dict
from pretrain.model import GPTConfig
from pretrain.tokenizer import eos_id

# Our parameter names -> Hugging Face Llama's, per block and for the rest.
BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}
TOP_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def to_hf_state_dict(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
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
            out[prefix + BLOCK_NAMES[rest]] = tensor
    return {name: tensor.contiguous().clone() for name, tensor in out.items()}


def from_hf_state_dict(hf: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """The inverse of ``to_hf_state_dict``: an exported folder's weights under our names."""
    out = {ours: hf[theirs] for ours, theirs in TOP_NAMES.items() if theirs in hf}
    if config.tie_embeddings or "lm_head.weight" not in hf:
        out["lm_head.weight"] = out["embed.weight"]
    for i in range(config.n_layer):
        prefix = f"model.layers.{i}."
        qkv = [hf[f"{prefix}self_attn.{p}_proj.weight"] for p in "qkv"]
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat(qkv)
        out |= {f"blocks.{i}.{ours}": hf[prefix + theirs] for ours, theirs in BLOCK_NAMES.items()}
    return out


def hf_config(config: GPTConfig, eos: int, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.padded_vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": eos,  # documents are separated, and so begin, with end-of-text
        "eos_token_id": eos,
        "initializer_range": 0.02,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def export(checkpoint: str, out_dir: str, overwrite: bool = False) -> Path:
    """Write the Hugging Face folder; built beside ``out_dir`` and renamed into place when complete.

    Args:
        checkpoint: A .ckpt file or a sharded checkpoint folder written by training.
        out_dir: The folder to create.
        overwrite: Replace ``out_dir`` if it exists.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; choose another OUT_DIR or add --overwrite true.")
    loaded = load_checkpoint(checkpoint)
    config = model_config(loaded)
    tokenizer = load_tokenizer_from_checkpoint(loaded)
    state = to_hf_state_dict(model_state_dict(loaded), config)
    eos = eos_id(tokenizer)
    eos_token = tokenizer.id_to_token(eos)

    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(state, staging / "model.safetensors", metadata={"format": "pt"})
    dtype = next(iter(state.values())).dtype
    (staging / "config.json").write_text(json.dumps(hf_config(config, eos, dtype), indent=2) + "\n")
    tokenizer.save(str(staging / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eos_token,
        "eos_token": eos_token,
        "model_max_length": config.seq_len,
        "add_bos_token": False,
        "add_eos_token": False,
    }
    (staging / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (staging / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": eos_token, "eos_token": eos_token}) + "\n"
    )
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


def load_exported_weights(folder: str | Path, config: GPTConfig) -> dict[str, torch.Tensor]:
    """Our-named weights from a folder this module exported (for continued pretraining)."""
    return from_hf_state_dict(load_file(str(Path(folder) / "model.safetensors")), config)


if __name__ == "__main__":
    from jsonargparse import auto_cli

    try:
        print(f"Exported to {auto_cli(export, as_positional=True)}")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
