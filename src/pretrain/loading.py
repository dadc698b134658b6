"""Read a finished run back: the model and tokenizer from a Lightning checkpoint (file or sharded folder)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict  # fills an empty dict, as Lightning's

from pretrain.data import PretrainData
from pretrain.errors import UserError
from pretrain.model import GPT, GPTConfig

DATA_STATE_KEY = PretrainData.__qualname__  # Lightning stores the data module's state_dict under its class name


# Where a sharded checkpoint keeps its weights: FSDPStrategy writes ``model``, ModelParallelStrategy ``state_dict``.
SHARDED_WEIGHT_KEYS = {"model", "state_dict"}
# Every global a sharded checkpoint's index (``.metadata``) needs, by module; see check_sharded_index.
_INDEX_GLOBALS = {
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
}


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's weights and plain values as one dict, on the CPU; nothing in it can run code.

    A file is loaded weights-only. A folder is a sharded checkpoint: its index is checked first
    (``check_sharded_index``), then only the weights are read, not the optimizer's state (twice
    their size), and its ``meta.pt`` weights-only. ``state_dict`` holds the weights either way.
    """
    path = Path(path)
    if path.is_dir():
        check_sharded_index(path)
        checkpoint: dict[str, Any] = {}
        planner = _EmptyStateDictLoadPlanner(keys=SHARDED_WEIGHT_KEYS)
        _load_state_dict(checkpoint, storage_reader=FileSystemReader(path), planner=planner, no_dist=True)
        if (path / "meta.pt").is_file():  # Lightning's file of everything but weights and optimizer state
            checkpoint.update(torch.load(path / "meta.pt", map_location="cpu", weights_only=True))
        if "model" in checkpoint:
            checkpoint["state_dict"] = checkpoint.pop("model")
        return checkpoint
    if not path.is_file():
        raise UserError(f"Checkpoint {path} does not exist; give a .ckpt file or a sharded checkpoint folder.")
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # Judged before anything is imported or looked up. No dotted names: pickle would follow them
        # through attributes (e.g. from a module to the modules it imported).
        if "." in name or not _index_global(module, name):
            raise pickle.UnpicklingError(f"{module}.{name}")
        return super().find_class(module, name)


def _index_global(module: str, name: str) -> bool:
    if name in _INDEX_GLOBALS.get(module, ()):
        return True
    if module == "torch":
        return isinstance(getattr(torch, name, None), torch.dtype)
    if module == dcp_metadata.__name__:  # the record types defined there, nothing it imported
        found = getattr(dcp_metadata, name, None)
        return isinstance(found, type) and found.__module__ == module
    return False


def check_sharded_index(folder: Path) -> None:
    """Refuse a sharded checkpoint whose index could run code when read.

    torch.distributed.checkpoint unpickles ``.metadata`` without restrictions; it is read here first
    with only the types such an index holds (its record classes, dtypes, sizes, paths).
    """
    index = folder / ".metadata"
    if not index.is_file():
        raise UserError(f"{folder} is not a sharded checkpoint: it has no .metadata file.")
    try:
        with index.open("rb") as file:
            _IndexUnpickler(file).load()
    except (pickle.UnpicklingError, AttributeError, ImportError) as error:
        raise UserError(
            f"The sharded checkpoint {folder} names {error} in its index (.metadata), which is not part of a "
            "checkpoint index and could run code when read, so it was not loaded. If you trust where it came "
            "from, --ckpt_path accepts it with --weights_only false."
        ) from None


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
