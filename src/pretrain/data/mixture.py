"""Weighted mixtures: several named datasets, each prepared into its own shards with one shared
tokenizer, and sampled by weight during training.

    data:
      data_dir: data/mix
      mixture:
        code: {sources: [stdlib], weight: 3}
        prose: {sources: ["books/*.txt"], weight: 1}
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from pretrain.data.build import (
    BuildOptions,
    build_of_absent_sources,
    build_shards,
    build_tokenizer,
    ensure_next_line_task,
    existing_build,
    listing_digest,
    manifest_of,
    peak_rss_mb,
    warn_on_val_share,
    write_json_atomic,
)
from pretrain.data.build_lock import one_builder
from pretrain.data.next_line import write_mixture_task, write_next_line_task
from pretrain.data.ownership import claim_outputs, new_scratch, remove_leftover_scratch
from pretrain.data.plan import DocumentSplit, plan_units
from pretrain.data.source_overlap import refuse_overlap
from pretrain.data.sources import Corpus, any_source_found, resolve_sources
from pretrain.errors import SourcesNotFound, UserError

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


def prepare_mixture(mixture: dict[str, Any], data_dir: str, **options: Any) -> dict[str, Any]:
    """Build each dataset of the mixture into ``data_dir/<name>`` with one tokenizer; returns the manifest.
    ``options``: ``BuildOptions``' fields.

    The tokenizer, when not given, is trained on a sample of the training documents of every dataset
    together. The manifest written last in ``data_dir`` lists each dataset's sources, weight, share of
    the training samples and its own counts. Each dataset's next-line task is in ``data_dir/<name>/evals/``,
    and ``data_dir/evals/next_line.jsonl`` takes their questions in turn.
    """
    components = check_mixture(mixture)
    built_with = BuildOptions(**options)
    ranks, root = built_with.ranks, Path(data_dir)
    request = {  # what the shards depend on; the weights only act while training
        "mixture": {name: {"sources": c["sources"]} for name, c in components.items()},
        **built_with.request(),
    }
    ranks.on_first(lambda: refuse_overlap([s for c in components.values() for s in c["sources"]], root))
    with one_builder(root, ranks):
        return _prepare_locked(components, root, built_with, request)


def _prepare_locked(components: dict[str, Any], root: Path, built_with: BuildOptions, request: dict) -> dict[str, Any]:
    """``prepare_mixture``, by the one builder of ``root``."""
    ranks, val_fraction = built_with.ranks, built_with.val_fraction

    def check() -> tuple[dict | None, dict[str, Corpus] | None, dict, Path | None]:
        remove_leftover_scratch(root)
        try:
            corpora = {name: resolve_sources(c["sources"], built_with.text_field) for name, c in components.items()}
        except SourcesNotFound:
            every_source = [source for c in components.values() for source in c["sources"]]
            if not any_source_found(every_source) and (served := build_of_absent_sources(root, request)):
                return _record_weights(root, served, components), None, request, None
            raise
        listing = {name: corpus.listing() for name, corpus in corpora.items()}
        for name, corpus in corpora.items():
            request["mixture"][name]["files"] = listing_digest(corpus.listing())
        if manifest := existing_build(root, request, listing, built_with.overwrite):
            return _record_weights(root, manifest, components), None, request, None
        claim_outputs(root, list(components), built_with.tokenizer)
        return None, corpora, request, new_scratch(root)

    started = time.perf_counter()
    manifest, corpora, request, scratch = ranks.on_first(check)
    if manifest is not None:
        ranks.on_first(lambda: ensure_next_line_task(root, list(components)))
        return manifest
    split = DocumentSplit(val_fraction)
    plans = ranks.everywhere(lambda: {name: plan_units(corpus.files, val_fraction) for name, corpus in corpora.items()})
    tok = build_tokenizer(root, list(plans.values()), built_with, scratch)
    built = {}
    for name, units in plans.items():
        log.info("Preparing mixture dataset %r", name)
        shards = build_shards(units, split, built_with.text_field, tok, root / name, scratch / name,
                              built_with.chunk_bytes, ranks, built_with.progress)  # fmt: skip
        built[name] = ranks.on_first(lambda name=name, shards=shards: _dataset_manifest(
            root / name, {"sources": components[name]["sources"]}, tok, root, shards, corpora[name],
            len(plans[name]), ranks.world_size))  # fmt: skip
    rss = ranks.gather(peak_rss_mb())

    def finish() -> dict[str, Any]:
        manifest = _mixture_manifest(request, components, built, time.perf_counter() - started)
        manifest["peak_rss_mb"] = rss
        write_json_atomic(root / "files.json", {name: corpus.listing() for name, corpus in corpora.items()})
        write_mixture_task(root, [root / name for name in components])
        shutil.rmtree(scratch, ignore_errors=True)
        write_json_atomic(root / "manifest.json", manifest)
        for name in components:
            warn_on_val_share(root / name, built[name]["splits"], val_fraction)
        log.info("Prepared mixture %s: %s", root, json.dumps(manifest["splits"]))
        return manifest

    return ranks.on_first(finish)


def _dataset_manifest(folder: Path, request: dict, tokenizer: Tokenizer, root: Path, shards: dict, corpus: Corpus,
                      units: int, processes: int) -> dict[str, Any]:  # fmt: skip
    """One dataset's own manifest, in its folder, for reading it alone (the mixture's manifest holds them all)."""
    manifest = manifest_of(request, tokenizer, root, shards, corpus, units, processes, [], 0.0)
    write_next_line_task(folder, tokenizer)
    write_json_atomic(folder / "manifest.json", manifest)
    return manifest


def _record_weights(root: Path, manifest: dict[str, Any], components: dict) -> dict[str, Any]:
    """New weights over an existing build: nothing to rebuild, but the manifest says how it is mixed now."""
    weights = {name: (c["weight"], round(c["share"], 6)) for name, c in components.items()}
    if weights != {name: (m["weight"], m["share"]) for name, m in manifest["mixture"].items()}:
        for name, (weight, share) in weights.items():
            manifest["mixture"][name].update(weight=weight, share=share)
        write_json_atomic(root / "manifest.json", manifest)
    return manifest


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
        "splits": _total_splits(built),
        "source_bytes": sum(m["source_bytes"] for m in built.values()),
        "skipped_files": total("skipped_files"),
        "skipped_records": total("skipped_records"),
        "invalid_utf8_documents": sum(m["invalid_utf8_documents"] for m in built.values()),
        "duplicate_documents": sum(m["duplicate_documents"] for m in built.values()),
        "pieces": sum(m["pieces"] for m in built.values()),
        "seconds": round(seconds, 2),
        "chunks": {f"{name}/{chunk}": digest for name, m in built.items() for chunk, digest in m["chunks"].items()},
    }


def _total_splits(built: dict) -> dict[str, dict[str, Any]]:
    splits = {
        split: {key: sum(m["splits"][split][key] for m in built.values()) for key in ("documents", "tokens")}
        for split in ("train", "val")
    }
    tokens = sum(split["tokens"] for split in splits.values())
    for split in splits.values():
        split["share"] = round(split["tokens"] / tokens, 6)
    return splits
