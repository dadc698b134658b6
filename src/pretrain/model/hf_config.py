"""A Hugging Face ``config.json`` (Llama, Qwen3) read as our ``LlamaConfig``, or refused field by field.

Continued pretraining starts from folders ``transformers`` saved. A field that changes the model's arithmetic
and that our Llama does not reproduce would make it a different model under the same weights (a loss of 12 on
the first step, or worse, a model slightly off): each such field is refused with a line naming it, and so is
any field not known here. Fields that only describe the folder or generation (token ids, dtype, cache) are
read past.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pretrain.errors import UserError
from pretrain.model.config import LlamaConfig
from pretrain.model.hf_layout import check_init_from, is_hf_folder

SUPPORTED = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# Fields with no effect on the model's outputs in training: the folder, generation, the cache, initialisation.
NO_EFFECT = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "bos_token_id", "eos_token_id",
    "pad_token_id", "use_cache", "initializer_range", "max_position_embeddings", "pretraining_tp",
    "tie_word_embeddings", "_name_or_path", "max_window_layers", "_attn_implementation_autoset",
}  # fmt: skip
# Fields that must hold one value (the one our Llama computes with), by name.
REQUIRED_VALUES: dict[str, tuple[Any, ...]] = {
    "attention_bias": (False,),
    "mlp_bias": (False,),
    "hidden_act": ("silu",),
    "attention_dropout": (0, 0.0),
    "use_sliding_window": (False,),
    "sliding_window": (None,),  # read only with use_sliding_window, which must be false
}
READ = {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "rms_norm_eps", "head_dim", "rope_theta", "rope_scaling", "rope_parameters", "layer_types",
}  # fmt: skip


def read_hf_config(folder: Path, seq_len: int) -> LlamaConfig:
    """The ``LlamaConfig`` of the model in ``folder`` (its ``config.json``), for training on ``seq_len`` tokens."""
    path = folder / "config.json"
    try:
        hf = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{path} cannot be read as a model config: {error}") from None
    return llama_config_from_hf(hf, seq_len, str(path))


def llama_config_from_hf(hf: dict[str, Any], seq_len: int, where: str = "config.json") -> LlamaConfig:
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise UserError(
            f"{where}: model_type {model_type!r} is not supported; models of type {sorted(SUPPORTED)} "
            f"({', '.join(SUPPORTED.values())}) can be started from."
        )
    sliding = hf.get("use_sliding_window", False)
    for field, allowed in REQUIRED_VALUES.items():
        if field in hf and hf[field] not in allowed and not (field == "sliding_window" and not sliding):
            raise UserError(f"{where}: {field}: {hf[field]!r} is not supported (only {allowed[0]!r}).")
    if "quantization_config" in hf:
        raise UserError(
            f"{where}: quantization_config: the weights are quantized; start from the model's unquantized folder."
        )
    unknown = sorted(set(hf) - NO_EFFECT - set(REQUIRED_VALUES) - READ)
    if unknown:
        raise UserError(
            f"{where}: {', '.join(unknown)} not understood, so the model might not be reproduced; remove the "
            "field if it has no effect on the model's outputs."
        )
    if any(kind != "full_attention" for kind in hf.get("layer_types") or []):
        raise UserError(f"{where}: layer_types other than full_attention are not supported.")
    try:
        return _llama_config(hf, model_type, seq_len, where)
    except KeyError as error:
        raise UserError(f"{where} lacks {error}, which a {SUPPORTED[model_type]} config has.") from None
    except (ValueError, TypeError) as error:
        raise UserError(f"{where}: {error}.") from None


def _llama_config(hf: dict[str, Any], model_type: str, seq_len: int, where: str) -> LlamaConfig:
    n_head = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_head
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        seq_len=seq_len,
        d_model=hf["hidden_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head,
        ffn_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qk_norm=model_type == "qwen3",
        padding_multiple=1,  # the checkpoint's vocabulary as it is: its rows are the tokenizer's ids
        attention_head_dim=None if head_dim * n_head == hf["hidden_size"] else head_dim,
        **_rope_fields(hf, where),
    )


def _rope_fields(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """rope_theta and Llama 3's scaling, from ``rope_scaling`` + ``rope_theta`` or from ``rope_parameters``."""
    both = [hf.get("rope_parameters"), hf.get("rope_scaling")]
    if all(both) and {**both[0], "rope_theta": None} != {**both[1], "rope_theta": None}:
        raise UserError(f"{where}: rope_parameters and rope_scaling differ; keep the one the model was saved with.")
    rope = dict(both[0] or both[1] or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10_000.0))
    kind = rope.pop("rope_type", rope.pop("type", "default"))
    if kind == "default" and not rope:
        return {"rope_base": float(theta)}
    if kind == "default":
        raise UserError(f"{where}: the rope parameters {', '.join(sorted(rope))} are not supported.")
    if kind != "llama3":
        raise UserError(f"{where}: rope_type {kind!r} is not supported (default or llama3).")
    known = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    if missing := sorted(known - set(rope)):
        raise UserError(f"{where}: the llama3 rope scaling lacks {', '.join(missing)}.")
    if extra := sorted(set(rope) - known):
        raise UserError(f"{where}: the llama3 rope scaling's {', '.join(extra)} not understood.")
    if empty := sorted(name for name in known if not isinstance(rope[name], int | float)):
        raise UserError(f"{where}: the llama3 rope scaling's {', '.join(empty)} must be a number.")
    return {
        "rope_base": float(theta),
        "rope_factor": float(rope["factor"]),
        "rope_low_freq_factor": float(rope["low_freq_factor"]),
        "rope_high_freq_factor": float(rope["high_freq_factor"]),
        "rope_original_context": int(rope["original_max_position_embeddings"]),
    }


def source_model_record(init_from: str | None) -> dict[str, Any] | None:
    """What export gives back of a Hugging Face folder a run started from, beyond its architecture: the context
    it was made for (``max_position_embeddings``, often longer than the run's ``seq_len``) and its
    ``generation_config.json`` (stop tokens, sampling defaults). None for any other start."""
    if not (init_from and is_hf_folder(init_from)):
        return None
    folder = Path(init_from)
    generation = folder / "generation_config.json"
    try:
        return {
            "max_position_embeddings": json.loads((folder / "config.json").read_text()).get("max_position_embeddings"),
            "generation_config": json.loads(generation.read_text()) if generation.is_file() else None,
        }
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{folder}: {error}") from None


def model_architecture(
    preset: str, overrides: dict[str, Any] | None, vocab_size: int, seq_len: int, init_from: str | None
) -> LlamaConfig:
    """The architecture a run trains: a Hugging Face folder's own (``init_from``), with ``overrides`` allowed only
    where they agree with it; otherwise the preset with ``overrides``, the vocabulary and length from the data."""
    if init_from:
        check_init_from(init_from)
    if not (init_from and is_hf_folder(init_from)):
        try:
            return LlamaConfig.from_preset(preset, vocab_size=vocab_size, seq_len=seq_len, **(overrides or {}))
        except ValueError as error:
            raise UserError(f"model: {error}. Fix model.preset or model.overrides.") from None
    config = read_hf_config(Path(init_from), seq_len)
    differing = [
        f"{name}: {value} (the folder's: {getattr(config, name, 'no such field')})"
        for name, value in (overrides or {}).items()
        if getattr(config, name, object()) != value
    ]
    if differing:
        raise UserError(
            f"model.overrides {'; '.join(differing)} differ from {init_from}/config.json, where the architecture "
            "comes from; remove them."
        )
    if vocab_size > config.vocab_size:
        raise UserError(
            f"The data's vocabulary ({vocab_size} ids) is larger than the model's in {init_from} "
            f"({config.vocab_size}): prepare the data with the model's own tokenizer."
        )
    return config
