"""Export a checkpoint as a Hugging Face Llama folder (Qwen3 with QK-norm): ``pretrain export CKPT OUT``.

The folder loads with ``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` and
``AutoTokenizer.from_pretrained(OUT_DIR)``: safetensors weights, config.json, tokenizer files.
Post-training tools (fine-tuning, instruction tuning, RLHF) read it as they read any Llama.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from jsonargparse import auto_cli
from safetensors.torch import save_file

from pretrain.checkpointing.loading import (
    checkpoint_bounds,
    checkpoint_tokenizer_files,
    load_checkpoint,
    load_tokenizer_from_checkpoint,
    model_config,
    model_state_dict,
)
from pretrain.commands.export_tokenizer import write_tokenizer_files
from pretrain.data.prepare.tokenizer_files import beginning_id
from pretrain.errors import UserError, run_command
from pretrain.model.config import LlamaConfig
from pretrain.model.hf_layout import to_hf_state_dict


def hf_config(
    config: LlamaConfig, bos: int, eos: int, dtype: torch.dtype, context: int | None = None
) -> dict[str, Any]:
    """Llama's architecture; with ``qk_norm``, Qwen3's: Llama's blocks plus an RMSNorm of each head's queries
    and keys before the rotary embedding, as ours. ``context``: the public model's own, where the run started
    from one made for a longer context than it trained on."""
    qwen3 = {"use_sliding_window": False, "sliding_window": None, "max_window_layers": config.n_layer}
    return {
        "architectures": ["Qwen3ForCausalLM" if config.qk_norm else "LlamaForCausalLM"],
        "model_type": "qwen3" if config.qk_norm else "llama",
        **(qwen3 if config.qk_norm else {}),
        "vocab_size": config.padded_vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "max_position_embeddings": max(config.seq_len, context or 0),
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base,
        **({"rope_scaling": llama3_scaling(config)} if config.rope_scaling else {}),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "initializer_range": 0.02,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def llama3_scaling(config: LlamaConfig) -> dict[str, Any]:
    """Llama 3's rotary scaling as ``transformers`` reads it."""
    return {
        "rope_type": "llama3",
        "factor": config.rope_factor,
        "low_freq_factor": config.rope_low_freq_factor,
        "high_freq_factor": config.rope_high_freq_factor,
        "original_max_position_embeddings": config.rope_original_context,
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
    bounds = checkpoint_bounds(loaded, tokenizer)

    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(state, staging / "model.safetensors", metadata={"format": "pt"})
    tokenizer_json, companions = checkpoint_tokenizer_files(loaded)
    changes = write_tokenizer_files(staging, tokenizer_json, companions, bounds, config.seq_len)
    for change in changes:
        print(f"Changed from the tokenizer's own files: {change}")
    dtype = next(iter(state.values())).dtype
    first = beginning_id(tokenizer, companions, bounds)
    source = loaded.get("source_model") or {}  # the public model the run started from, if any
    hf = hf_config(config, first, bounds.eos, dtype, source.get("max_position_embeddings"))
    (staging / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    if source.get("generation_config"):
        (staging / "generation_config.json").write_text(json.dumps(source["generation_config"], indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


def main(argv: list[str] | None = None) -> None:
    """``pretrain export CHECKPOINT OUT_DIR``."""
    print(f"Exported to {auto_cli(export, args=argv, as_positional=True, prog='pretrain export')}")


if __name__ == "__main__":
    run_command(main)
