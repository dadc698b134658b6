"""Whether a checkpoint continues the experiment a config describes: judged before anything is built or written.

A run stays the same run while its model's shape, its tokenizer, its data build and its block length stay as
they were. ``--ckpt_path last`` refuses a checkpoint where one of them changed: another experiment saved under
the same logger name (a copied config, a sweep) would otherwise take its weights and overwrite its
``config.yaml``. Everything else a resume may change on purpose (the learning rate, z-loss, more steps); what
the command line and the configs say always applies, and each setting that differs from the run's saved
``config.yaml`` is printed once, so a sweep that shares a name is seen at once.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from pretrain.checkpointing.loading import model_config
from pretrain.data.identity import build_identity
from pretrain.data.prepare.manifest import read_manifest
from pretrain.errors import UserError
from pretrain.model.hf_config import model_architecture

# Settings that name a resume rather than the run: never reported as changes.
NOT_SETTINGS = {"ckpt_path", "config", "trainer.logger.init_args.version", "model.init_from"}


def read_checkpoint_record(path: Path, weights_only: bool = True) -> dict[str, Any]:
    """A checkpoint's plain values, its weights left on disk: a file mapped, a sharded folder's ``meta.pt``."""
    source = path / "meta.pt" if path.is_dir() else path
    if not source.is_file():
        return {}
    checkpoint = torch.load(source, map_location="cpu", weights_only=weights_only, mmap=True)
    return {key: checkpoint[key] for key in ("architecture", "hyper_parameters", "loops") if key in checkpoint}


def run_changes(record: dict[str, Any], model: dict[str, Any], data: dict[str, Any]) -> list[str]:
    """What makes the run of ``record`` another run than the ``model`` and ``data`` settings describe, in words:
    the model's shape, the tokenizer, the data build, the block length. Empty for the same run."""
    return _model_changes(record, model) + _data_changes(record, data)


def _model_changes(record: dict[str, Any], model: dict[str, Any]) -> list[str]:
    """Architecture fields that differ; vocabulary and length follow the data and are judged there (a Hugging Face
    folder's vocabulary is its own, compared through its other fields)."""
    hparams = record.get("hyper_parameters")
    if "architecture" not in record and (not hparams or "preset" not in hparams):
        return []
    saved = model_config(record)
    try:
        now = model_architecture(
            model.get("preset") or "tiny",
            model.get("overrides"),
            saved.vocab_size,
            saved.seq_len,
            model.get("init_from"),
        )
    except (UserError, TypeError):  # the module reports a bad preset, override or folder in its own words
        return []
    before, after = dataclasses.asdict(saved), dataclasses.asdict(now)
    return [
        f"model {name} {before[name]} -> {after[name]}"
        for name in before
        if name not in ("vocab_size", "seq_len") and before[name] != after[name]
    ]


def _data_changes(record: dict[str, Any], data: dict[str, Any]) -> list[str]:
    stream = training_stream(record)
    if stream is None:
        return []
    changes = []
    if "block_len" in stream and data.get("seq_len") is not None and stream["block_len"] != data["seq_len"] + 1:
        changes.append(f"data.seq_len {stream['block_len'] - 1} -> {data['seq_len']}")
    data_dir = str(data.get("data_dir") or "")
    manifest = read_manifest(data_dir) if data_dir and "://" not in data_dir else None
    if manifest is None:  # not built yet, or remote: the data loader compares the build when it reads it
        return changes
    tokenizer = manifest["tokenizer"]["sha256"][:16]
    if stream.get("tokenizer") not in (None, tokenizer):
        changes.append(f"tokenizer {stream['tokenizer']} -> {tokenizer} (in {data_dir})")
    elif stream.get("build") not in (None, build := build_identity(manifest)):
        changes.append(f"data build {stream['build']} -> {build} (in {data_dir})")
    return changes


def training_stream(record: dict[str, Any]) -> dict[str, Any] | None:
    """Where the checkpoint stood in its training data, and what that data was (``pretrain.data.identity``)."""
    try:
        stream = record["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    except (KeyError, IndexError, TypeError):
        return None
    return stream if isinstance(stream, dict) else None


def saved_config_path(checkpoint: Path) -> Path | None:
    """The ``config.yaml`` of the run folder a checkpoint was saved in (``version_N/checkpoints/X.ckpt``)."""
    path = checkpoint.parent.parent / "config.yaml"
    return path if checkpoint.parent.name == "checkpoints" and path.is_file() else None


def setting_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key: before -> after`` for each setting both configs hold with different values."""
    before, after = _flatten(saved), _flatten(now)
    return [
        f"{key}: {before[key]} -> {after[key]}"
        for key in sorted(before.keys() & after.keys())
        if key not in NOT_SETTINGS and before[key] != after[key]
    ]


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(config, dict):
        items = config.items()
    elif isinstance(config, list) and any(isinstance(item, (dict, list)) for item in config):
        items = enumerate(config)
    else:
        return {prefix: config}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat
