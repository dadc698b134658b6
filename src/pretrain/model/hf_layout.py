"""Our parameter names and Hugging Face Llama's (Qwen3's with QK-norm), both ways: for export, and for reading an
exported folder back."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from pretrain.errors import UserError
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
    """The inverse of ``to_hf_state_dict``: a Hugging Face folder's weights under our names. A tensor left over
    (a bias, a layer the config does not have) is refused by name: it would be dropped silently otherwise."""

    def tensor(name: str) -> torch.Tensor:
        if name not in hf:
            raise UserError(f"The folder's weights lack {name}, which its config.json says the model has.")
        return hf[name]

    out = {ours: tensor(theirs) for ours, theirs in TOP_NAMES.items() if theirs != "lm_head.weight" or theirs in hf}
    used = {theirs for theirs in TOP_NAMES.values() if theirs in hf}
    if not config.tie_embeddings and "lm_head.weight" not in hf:
        raise UserError(
            "The folder's weights lack lm_head.weight, and its config.json does not tie the head to the embedding "
            "(tie_word_embeddings is false or absent): set it true if the model was saved tied."
        )
    if config.tie_embeddings and "lm_head.weight" in hf and not torch.equal(hf["lm_head.weight"], out["embed.weight"]):
        raise UserError(
            "The folder's lm_head.weight differs from its model.embed_tokens.weight, but its config.json ties them "
            "(tie_word_embeddings: true): set it false if the model has a head of its own."
        )
    if config.tie_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
    names = {**BLOCK_NAMES, **QK_NORM_NAMES} if config.qk_norm else BLOCK_NAMES
    for i in range(config.n_layer):
        prefix = f"model.layers.{i}."
        qkv = [f"{prefix}self_attn.{p}_proj.weight" for p in "qkv"]
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([tensor(name) for name in qkv])
        out |= {f"blocks.{i}.{ours}": tensor(prefix + theirs) for ours, theirs in names.items()}
        used |= {*qkv, *(prefix + theirs for theirs in names.values())}
    if left := sorted(name for name in set(hf) - used if not name.endswith("rotary_emb.inv_freq")):  # a buffer
        shown = ", ".join(left[:4]) + (f" and {len(left) - 4} more" if len(left) > 4 else "")
        raise UserError(f"The folder's weights hold {shown}, which this model has no place for.")
    return out


def read_safetensors_folder(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder: ``model.safetensors``, or the files its index lists."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UserError(f"{folder} holds neither model.safetensors nor model.safetensors.index.json.")
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        weights.update(load_file(str(folder / name)))
    return weights


def load_exported_weights(folder: str | Path, config: LlamaConfig) -> dict[str, torch.Tensor]:
    """Our-named weights from a Hugging Face folder (``pretrain export``'s or ``transformers``')."""
    return from_hf_state_dict(read_safetensors_folder(folder), config)


def check_init_from(path: str | Path) -> None:
    """Refuse, before anything is built, a folder that is neither a Hugging Face model (``config.json`` +
    safetensors) nor a sharded checkpoint. (A missing path is named where it is read: a resumed run does not read
    a checkpoint it started from.)"""
    path = Path(path)
    if not path.is_dir() or is_hf_folder(path) or (path / ".metadata").is_file():
        return
    if any(path.glob("pytorch_model*.bin")):
        raise UserError(
            f"model.init_from {path} holds PyTorch .bin weights only: save it again with safetensors "
            "(AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder)), then start from that."
        )
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
        raise UserError(f"model.init_from {path} has weights but no config.json: copy the model's config.json there.")
    raise UserError(
        f"model.init_from {path} is neither a Hugging Face model folder (config.json and model.safetensors) nor a "
        "checkpoint of a run."
    )


def is_hf_folder(path: str | Path) -> bool:
    """A folder with a model ``config.json`` and safetensors weights, as ``save_pretrained`` writes."""
    folder = Path(path)
    return (folder / "config.json").is_file() and any(
        (folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")
    )
