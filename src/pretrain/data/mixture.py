"""Weighted mixtures: several named datasets, each prepared into its own shards with one shared
tokenizer, and sampled by weight during training.

    data:
      data_dir: data/mix
      mixture:
        code: {sources: [stdlib], weight: 3}
        prose: {sources: ["books/*.txt"], weight: 1}
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from pretrain.data.build import (
    existing_build,
    plan_split,
    prepare,
    tokenizer_request,
    training_texts,
    write_json_atomic,
)
from pretrain.data.sources import resolve_sources
from pretrain.data.tokenizer import load_tokenizer, train_tokenizer
from pretrain.errors import UserError

log = logging.getLogger(__name__)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def check_mixture(mixture: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{name: {sources: [...], weight: w}}`` validated, with ``share`` (the weight over the sum) added."""
    if not isinstance(mixture, dict) or not mixture:
        raise UserError("data.mixture must map dataset names to {sources: [...], weight: w}.")
    checked = {}
    for name, spec in mixture.items():
        if not _NAME.fullmatch(str(name)) or name in ("train", "val"):
            raise UserError(f"Mixture name {name!r} becomes a folder: use letters, digits, '_', '-' (not train, val).")
        if not isinstance(spec, dict) or set(spec) != {"sources", "weight"}:
            raise UserError(f"data.mixture.{name} must be {{sources: [...], weight: w}}, got {spec!r}.")
        sources, weight = spec["sources"], spec["weight"]
        if not isinstance(sources, list) or not sources or not all(isinstance(s, str) for s in sources):
            raise UserError(f"data.mixture.{name}.sources must be a non-empty list of paths, got {sources!r}.")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
            raise UserError(f"data.mixture.{name}.weight must be a positive number, got {weight!r}.")
        checked[str(name)] = {"sources": list(sources), "weight": weight}
    total = sum(spec["weight"] for spec in checked.values())
    for spec in checked.values():
        spec["share"] = spec["weight"] / total
    return checked


def prepare_mixture(
    mixture: dict[str, Any],
    data_dir: str,
    vocab_size: int = 4096,
    tokenizer: str | None = None,
    val_fraction: float = 0.02,
    text_field: str = "text",
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Build each dataset of the mixture into ``data_dir/<name>`` with one tokenizer; returns the manifest.

    The tokenizer, when not given, is trained on the training documents of every dataset together.
    The manifest written last in ``data_dir`` lists each dataset's sources, weight, share of the
    training samples and its own counts.
    """
    components = check_mixture(mixture)
    root = Path(data_dir)
    request = {  # what the shards depend on; the weights only act while training
        "mixture": {name: {"sources": c["sources"]} for name, c in components.items()},
        "tokenizer": tokenizer_request(tokenizer, vocab_size),
        "val_fraction": val_fraction,
        "text_field": text_field,
    }
    if manifest := existing_build(root, request, overwrite):
        return _record_weights(root, manifest, components)
    started = time.perf_counter()
    (root / "manifest.json").unlink(missing_ok=True)  # never served while half-built
    root.mkdir(parents=True, exist_ok=True)
    shared = root / "tokenizer.json"
    if tokenizer:
        load_tokenizer(tokenizer).save(str(shared))
    else:
        log.info("Training a %d-token BPE tokenizer on the training split of %s", vocab_size, ", ".join(components))
        _train_shared_tokenizer(components, vocab_size, val_fraction, text_field).save(str(shared))

    built = {}
    for name, component in components.items():
        log.info("Preparing mixture dataset %r", name)
        built[name] = prepare(
            component["sources"], str(root / name), tokenizer=str(shared), val_fraction=val_fraction,
            text_field=text_field, overwrite=True, progress=progress,
        )  # fmt: skip
    manifest = _mixture_manifest(request, components, built, time.perf_counter() - started)
    write_json_atomic(root / "manifest.json", manifest)
    log.info("Prepared mixture %s: %s", root, json.dumps(manifest["splits"]))
    return manifest


def _record_weights(root: Path, manifest: dict[str, Any], components: dict) -> dict[str, Any]:
    """New weights over an existing build: nothing to rebuild, but the manifest says how it is mixed now."""
    weights = {name: (c["weight"], round(c["share"], 6)) for name, c in components.items()}
    if weights != {name: (m["weight"], m["share"]) for name, m in manifest["mixture"].items()}:
        for name, (weight, share) in weights.items():
            manifest["mixture"][name].update(weight=weight, share=share)
        write_json_atomic(root / "manifest.json", manifest)
    return manifest


def _train_shared_tokenizer(components: dict, vocab_size: int, val_fraction: float, text_field: str):
    texts = []
    for component in components.values():
        split, split_files = plan_split(resolve_sources(component["sources"], text_field).files, val_fraction)
        texts.append(training_texts(split_files["train"], split, text_field))
    return train_tokenizer(itertools.chain(*texts), vocab_size)


def _mixture_manifest(request: dict, components: dict, built: dict, seconds: float) -> dict[str, Any]:
    """Totals over the datasets (so ``summary`` reads it like a single build) plus the mixture itself."""
    first = next(iter(built.values()))

    def total(key: str) -> dict[str, int]:
        kinds = sorted({kind for m in built.values() for kind in m[key]})
        return {kind: sum(m[key].get(kind, 0) for m in built.values()) for kind in kinds}

    return {
        "version": first["version"],
        "request": request,
        "tokenizer": first["tokenizer"],
        "mixture": {
            name: {
                "sources": components[name]["sources"],
                "weight": components[name]["weight"],
                "share": round(components[name]["share"], 6),  # of the training samples drawn
                "splits": built[name]["splits"],
            }
            for name in components
        },
        "sampling": "sample i of the training stream comes from the dataset furthest behind its share "
        "(share * i - samples taken so far); each dataset reshuffles (data.seed) and restarts on its own "
        "when it runs out",
        "splits": {
            split: {key: sum(m["splits"][split][key] for m in built.values()) for key in ("documents", "tokens")}
            for split in ("train", "val")
        },
        "source_bytes": sum(m["source_bytes"] for m in built.values()),
        "skipped_files": total("skipped_files"),
        "skipped_records": total("skipped_records"),
        "invalid_utf8_documents": sum(m["invalid_utf8_documents"] for m in built.values()),
        "seconds": round(seconds, 2),
    }
