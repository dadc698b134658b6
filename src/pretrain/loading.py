"""Read a finished run back: the model and tokenizer from a Lightning checkpoint (file or sharded folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.load import _load_distributed_checkpoint
from lightning.pytorch.utilities.consolidate_checkpoint import _format_checkpoint
from tokenizers import Tokenizer

from pretrain.data import PretrainData
from pretrain.errors import UserError
from pretrain.model import GPT, GPTConfig

DATA_STATE_KEY = PretrainData.__qualname__  # Lightning stores the data module's state_dict under its class name


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint as one dict, on the CPU, loaded weights-only (nothing in it can run code).

    A folder is a sharded checkpoint: Lightning's own consolidation gathers it. FSDPStrategy names
    the weights ``model`` there and needs reformatting; ModelParallelStrategy already writes ``state_dict``.
    """
    path = Path(path)
    if path.is_dir():
        checkpoint = _load_distributed_checkpoint(path)
        return checkpoint if "state_dict" in checkpoint else _format_checkpoint(checkpoint)
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
