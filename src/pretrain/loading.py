"""Read a finished run back: the model and tokenizer from a Lightning checkpoint (file or sharded folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from pretrain.data import PretrainData
from pretrain.errors import UserError
from pretrain.model import GPT, GPTConfig
from pretrain.sharded import read_sharded_weights

DATA_STATE_KEY = PretrainData.__qualname__  # Lightning stores the data module's state_dict under its class name


# Where a sharded checkpoint keeps its weights: FSDPStrategy writes ``model``, ModelParallelStrategy ``state_dict``.
SHARDED_WEIGHT_KEYS = {"model", "state_dict"}


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's weights and plain values as one dict, on the CPU; nothing in it can run code.

    A file is loaded weights-only. A folder is a sharded checkpoint: it is checked first
    (``pretrain.sharded``), then only the weights are read, not the optimizer's state (twice
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


def model_config(checkpoint: dict[str, Any]) -> GPTConfig:
    """The architecture recorded in the checkpoint's hyperparameters (preset, overrides, vocab, seq_len)."""
    hparams = checkpoint["hyper_parameters"]
    return GPTConfig.from_preset(
        hparams["preset"], vocab_size=hparams["vocab_size"], seq_len=hparams["seq_len"], **(hparams["overrides"] or {})
    )


def model_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The GPT's own weights: the LightningModule's ``model.`` prefix removed."""
    return {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}


def load_model(checkpoint: dict[str, Any]) -> GPT:
    with torch.device("meta"):
        model = GPT(model_config(checkpoint))
    model.load_state_dict(model_state_dict(checkpoint), assign=True)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.init_rope()
    return model.eval()


def load_tokenizer_from_checkpoint(checkpoint: dict[str, Any]) -> Tokenizer:
    state = checkpoint.get(DATA_STATE_KEY)
    if not state or "tokenizer_json" not in state:
        raise UserError("The checkpoint holds no tokenizer; it was not written by this project's training.")
    return Tokenizer.from_str(state["tokenizer_json"])
