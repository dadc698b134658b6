"""Datasets: the named datasets of a weighted mixture, each prepared into its own shards with one shared
tokenizer and sampled by weight during training; a single corpus is a mixture of one, whose folder is
``data_dir`` itself.

    data:
      data_dir: data/mix
      mixture:
        code: {sources: [stdlib], weight: 3}
        prose: {sources: ["books/*.txt"], weight: 1}
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pretrain.data.prepare.manifest import listing_digest, write_json_atomic
from pretrain.data.prepare.options import BuildOptions
from pretrain.data.prepare.sources import Corpus
from pretrain.errors import UserError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
SINGLE = ""  # the one dataset of a single corpus: its folder is data_dir itself
Datasets = dict[str, dict[str, Any]]  # name -> {sources, weight, share}


def single_corpus(sources: list[str]) -> Datasets:
    return {SINGLE: {"sources": list(sources), "weight": 1, "share": 1.0}}


def is_single(datasets: Datasets) -> bool:
    return list(datasets) == [SINGLE]


def every_source(datasets: Datasets) -> list[str]:
    return [source for dataset in datasets.values() for source in dataset["sources"]]


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


def build_request(datasets: Datasets, options: BuildOptions) -> dict[str, Any]:
    """What the shards depend on: the sources (per dataset of a mixture; the weights only act while training)
    and the build options. The file listings' digests are added once the sources are listed."""
    if is_single(datasets):
        return {"sources": datasets[SINGLE]["sources"], **options.request()}
    return {"mixture": {name: {"sources": d["sources"]} for name, d in datasets.items()}, **options.request()}


def add_listings(request: dict[str, Any], corpora: dict[str, Corpus]) -> None:
    """Each dataset's file listing, as a digest, into the request: a changed file makes another build."""
    if set(corpora) == {SINGLE}:
        request["files"] = listing_digest(corpora[SINGLE].listing())
        return
    for name, corpus in corpora.items():
        request["mixture"][name]["files"] = listing_digest(corpus.listing())


def listing_of(corpora: dict[str, Corpus]) -> Any:
    """What ``files.json`` holds: the listing of a single corpus, or each dataset's by name."""
    if set(corpora) == {SINGLE}:
        return corpora[SINGLE].listing()
    return {name: corpus.listing() for name, corpus in corpora.items()}


def record_weights(root: Path, manifest: dict[str, Any], components: Datasets) -> dict[str, Any]:
    """New weights over an existing build: nothing to rebuild, but the manifest says how it is mixed now."""
    if is_single(components):
        return manifest
    weights = {name: (c["weight"], round(c["share"], 6)) for name, c in components.items()}
    if weights != {name: (m["weight"], m["share"]) for name, m in manifest["mixture"].items()}:
        for name, (weight, share) in weights.items():
            manifest["mixture"][name].update(weight=weight, share=share)
        write_json_atomic(root / "manifest.json", manifest)
    return manifest


def mixture_manifest(request: dict, components: dict, built: dict, seconds: float) -> dict[str, Any]:
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
        "splits": total_splits(built),
        "source_bytes": sum(m["source_bytes"] for m in built.values()),
        "skipped_files": total("skipped_files"),
        "skipped_records": total("skipped_records"),
        "invalid_utf8_documents": sum(m["invalid_utf8_documents"] for m in built.values()),
        "duplicate_documents": sum(m["duplicate_documents"] for m in built.values()),
        "pieces": sum(m["pieces"] for m in built.values()),
        "seconds": round(seconds, 2),
        "chunks": {f"{name}/{chunk}": digest for name, m in built.items() for chunk, digest in m["chunks"].items()},
    }


def total_splits(built: dict) -> dict[str, dict[str, Any]]:
    splits = {
        split: {key: sum(m["splits"][split][key] for m in built.values()) for key in ("documents", "tokens")}
        for split in ("train", "val")
    }
    tokens = sum(split["tokens"] for split in splits.values())
    for split in splits.values():
        split["share"] = round(split["tokens"] / tokens, 6)
    return splits
