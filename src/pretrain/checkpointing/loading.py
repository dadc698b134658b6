"""Read a finished run back: the model and tokenizer from a Lightning checkpoint (file or sharded folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from pretrain.checkpointing.sharded import read_sharded_weights
from pretrain.data.prepare.tokenizer import DocumentBounds, eos_id
from pretrain.errors import UserError
from pretrain.model.config import LlamaConfig
from pretrain.model.hf_layout import is_hf_folder, load_exported_weights
from pretrain.model.llama import Llama

# Lightning stores the data module's state_dict under its class name (a test checks it is PretrainData's):
# named here, not imported, so that reading a checkpoint imports neither Lightning nor litdata.
DATA_STATE_KEY = "PretrainData"


# Where a sharded checkpoint keeps its weights: FSDPStrategy writes ``model``, ModelParallelStrategy ``state_dict``.
SHARDED_WEIGHT_KEYS = {"model", "state_dict"}


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's weights and plain values as one dict, on the CPU; nothing in it can run code.

    A file is loaded weights-only. A folder is a sharded checkpoint: it is checked first
    (``pretrain.checkpointing.sharded``), then only the weights are read, not the optimizer's state (twice
    their size), and its ``meta.pt`` weights-only. ``state_dict`` holds the weights either way.
    """
    path = Path(path)
    if path.is_dir():
        checkpoint = read_sharded_weights(path, SHARDED_WEIGHT_KEYS)
        if (path / "meta.pt").is_file():  # Lightning's file of everything but weights and optimizer state
            checkpoint.update(torch.load(path / "meta.pt", map_location="cpu", weights_only=True))
        if "model" in checkpoint:
            checkpoint["state_dict"] = checkpoint.pop("model")
        return checkpoint
    if not path.is_file():
        raise UserError(f"Checkpoint {path} does not exist; give a .ckpt file or a sharded checkpoint folder.")
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def model_config(checkpoint: dict[str, Any]) -> LlamaConfig:
    """The architecture the checkpoint records: whole, or as its hyperparameters (preset, overrides, vocab,
    seq_len) in checkpoints saved before the architecture was."""
    if "architecture" in checkpoint:
        return LlamaConfig(**checkpoint["architecture"])
    hparams = checkpoint["hyper_parameters"]
    return LlamaConfig.from_preset(
        hparams["preset"], vocab_size=hparams["vocab_size"], seq_len=hparams["seq_len"], **(hparams["overrides"] or {})
    )


def model_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The Llama's own weights: the LightningModule's ``model.`` prefix removed."""
    return {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}


def load_model(checkpoint: dict[str, Any]) -> Llama:
    with torch.device("meta"):
        model = Llama(model_config(checkpoint))
    model.load_state_dict(model_state_dict(checkpoint), assign=True)
    model.tie_weights()
    model.init_rope()
    return model.eval()


def load_tokenizer_from_checkpoint(checkpoint: dict[str, Any]) -> Tokenizer:
    state = checkpoint.get(DATA_STATE_KEY)
    if not state or "tokenizer_json" not in state:
        raise UserError("The checkpoint holds no tokenizer; it was not written by this project's training.")
    return Tokenizer.from_str(state["tokenizer_json"])


def checkpoint_tokenizer_files(checkpoint: dict[str, Any]) -> tuple[str, dict[str, bytes]]:
    """The run's ``tokenizer.json`` as it was given or trained, and the files it came with (none in checkpoints
    saved before they were carried, or for a tokenizer trained here)."""
    load_tokenizer_from_checkpoint(checkpoint)  # the same error where there is none
    state = checkpoint[DATA_STATE_KEY]
    return state["tokenizer_json"], dict(state.get("tokenizer_files", {}))


def checkpoint_bounds(checkpoint: dict[str, Any], tokenizer: Tokenizer) -> DocumentBounds:
    """The tokens around each document the checkpoint was trained on: its end-of-text token and the one put
    before each document (``data.bos_token``), if any."""
    bos = (checkpoint.get(DATA_STATE_KEY) or {}).get("bos_id")
    return DocumentBounds(checkpoint_eos_id(checkpoint, tokenizer), int(bos) if bos is not None else None)


def checkpoint_eos_id(checkpoint: dict[str, Any], tokenizer: Tokenizer) -> int:
    """The token that ended each document the checkpoint was trained on: recorded with its tokenizer, or (in
    checkpoints saved before it was) found by its usual names."""
    recorded = (checkpoint.get(DATA_STATE_KEY) or {}).get("eos_id")
    return int(recorded) if recorded is not None else eos_id(tokenizer)


def raise_on_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], what: str) -> None:
    """Refuse weights that do not fit the model, listing each differing tensor (embedding first)."""
    expected_shapes = {name: tuple(t.shape) for name, t in expected.items()}
    found_shapes = {name: tuple(t.shape) for name, t in found.items()}
    names = list(expected_shapes) + [name for name in found_shapes if name not in expected_shapes]
    problems = [
        f"{name}: {found_shapes.get(name, 'missing')} vs config {expected_shapes.get(name, 'missing')}"
        for name in names
        if found_shapes.get(name) != expected_shapes.get(name)
    ]
    if problems:
        more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise UserError(
            f"{what} does not fit the configured model (vocabulary, preset or overrides differ):\n  "
            + "\n  ".join(problems[:8])
            + more
            + "\nUse the config the weights were trained with."
        )


def load_weights(path: str, config: LlamaConfig) -> dict[str, torch.Tensor]:
    """The model's weights from a checkpoint (file or sharded folder) or an exported folder, refused
    (each differing tensor named) unless they fit ``config``."""
    hf = is_hf_folder(path)
    weights = load_exported_weights(path, config) if hf else model_state_dict(load_checkpoint(path))
    with torch.device("meta"):  # shapes only
        expected = Llama(config).state_dict()
    raise_on_mismatch(expected, weights, f"The weights in {path}")
    return weights
