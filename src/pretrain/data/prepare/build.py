"""Raw text -> tokenizer + token shards, the one-time step before training: one path for a single corpus and
for a mixture (a single corpus is a mixture of one dataset, whose folder is ``data_dir`` itself).

Output, under ``data_dir`` (a mixture's shards, manifest and task in ``data_dir/<name>/`` each):
- ``tokenizer.json``: trained on a sample of the training split, or a copy of the given one;
- ``train/`` and ``val/``: litdata chunks of token ids. Each document is followed by exactly one
  end-of-text token and goes wholly to one split (``plan.DocumentSplit``); documents are written in a
  pseudo-random order over the whole corpus (``buckets``), exact duplicates once;
- ``evals/next_line.jsonl``: a multiple-choice task from the validation documents (``next_line``);
- ``files.json``: every source file's path, size and modification time, to notice a changed corpus;
- ``manifest.json``: what was asked for and what was built, with the sha256 of every chunk. Written last, so a
  build that was interrupted has none and is redone on the next run instead of being served.

The sources are only read (``source_overlap``); only what a build wrote is ever removed (``ownership``); and one
builder at a time works in a ``data_dir`` (``build_lock``), in a scratch folder of its own.

The work is shared by every process of a torchrun group (``Ranks``); alone, a process does it all:
1. rank 0 takes the build lock, lists the files and decides whether an existing build stands;
2. unless a tokenizer is given, every rank draws its units' part of a seeded sample of the training text
   (about ``tokenizer_sample_bytes`` in all) and rank 0 trains the tokenizer on it;
3. every rank encodes its units into its part of every bucket;
4. every rank writes whole buckets as chunks; rank 0 joins their indexes and writes the manifest.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from pretrain.data.prepare.build_lock import one_builder
from pretrain.data.prepare.manifest import (
    build_of_absent_sources,
    existing_build,
    manifest_of,
    peak_rss_mb,
    warn_on_val_share,
    write_json_atomic,
)
from pretrain.data.prepare.mixture import (
    SINGLE,
    Datasets,
    add_listings,
    build_request,
    check_mixture,
    every_source,
    is_single,
    listing_of,
    mixture_manifest,
    record_weights,
    single_corpus,
)
from pretrain.data.prepare.next_line import write_mixture_task, write_next_line_task
from pretrain.data.prepare.options import BuildOptions
from pretrain.data.prepare.ownership import claim_outputs, new_scratch, remove_leftover_scratch
from pretrain.data.prepare.plan import DocumentSplit, plan_units
from pretrain.data.prepare.shard_writer import build_shards
from pretrain.data.prepare.source_overlap import refuse_overlap
from pretrain.data.prepare.sources import Corpus, any_source_found, resolve_sources
from pretrain.data.prepare.tokenizer import DocumentBounds, document_bounds
from pretrain.data.prepare.tokenizer_sample import build_tokenizer
from pretrain.errors import SourcesNotFound

log = logging.getLogger(__name__)


def prepare(sources: list[str], data_dir: str, **options: Any) -> dict[str, Any]:
    """Build tokenizer and shards in ``data_dir`` from ``sources`` (files, directories, globs, URLs or
    ``stdlib``) unless an identical build is already there; ``options``: ``BuildOptions``' fields. Returns the
    manifest."""
    return build(single_corpus(sources), data_dir, BuildOptions(**options))


def prepare_mixture(mixture: dict[str, Any], data_dir: str, **options: Any) -> dict[str, Any]:
    """Build each dataset of the mixture into ``data_dir/<name>`` with one tokenizer, trained (when none is given)
    on a sample of every dataset's training documents; returns the manifest, which lists each dataset's sources,
    weight, share of the training samples and counts. ``data_dir/evals/next_line.jsonl`` takes the datasets'
    questions in turn."""
    return build(check_mixture(mixture), data_dir, BuildOptions(**options))


def build(datasets: Datasets, data_dir: str, built_with: BuildOptions) -> dict[str, Any]:
    """Build ``datasets`` in ``data_dir``, by its one builder, unless an identical build is there."""
    ranks, root = built_with.ranks, Path(data_dir)
    request = build_request(datasets, built_with)  # a typo in a size fails here, before anything is read
    ranks.on_first(lambda: refuse_overlap(every_source(datasets), root))
    with one_builder(root, ranks):
        return _build_locked(datasets, root, built_with, request)


def _build_locked(datasets: Datasets, root: Path, built_with: BuildOptions, request: dict) -> dict[str, Any]:
    ranks, val_fraction = built_with.ranks, built_with.val_fraction
    started = time.perf_counter()
    manifest, corpora, scratch = ranks.on_first(lambda: _standing_build(datasets, root, built_with, request))
    if manifest is not None:
        return manifest
    plans = ranks.everywhere(lambda: {name: plan_units(corpus.files, val_fraction) for name, corpus in corpora.items()})
    tokenizer = build_tokenizer(root, list(plans.values()), built_with, scratch)
    bounds = document_bounds(tokenizer, built_with.eos_token, built_with.bos_token)
    split, built = DocumentSplit(val_fraction), {}
    for name, units in plans.items():
        log.info("Tokenizing %d files into %s", len(corpora[name].files), root / name)
        options = (built_with.text_field, tokenizer, bounds, root / name, scratch / name, built_with.chunk_bytes)
        shards = build_shards(units, split, *options, ranks, built_with.progress)
        counts = (shards, corpora[name], len(units), ranks.world_size)
        built[name] = ranks.on_first(partial(_finish_dataset, root, name, tokenizer, bounds, request, counts))
    rss = ranks.gather(peak_rss_mb())

    def finish() -> dict[str, Any]:
        seconds = round(time.perf_counter() - started, 2)
        if is_single(datasets):
            manifest = {**built[SINGLE], "peak_rss_mb": rss, "seconds": seconds}
        else:
            manifest = {**mixture_manifest(request, datasets, built, seconds), "peak_rss_mb": rss}
            write_mixture_task(root, [root / name for name in datasets])
        write_json_atomic(root / "files.json", listing_of(corpora))
        shutil.rmtree(scratch, ignore_errors=True)
        write_json_atomic(root / "manifest.json", manifest)
        for name in datasets:
            warn_on_val_share(root / name, built[name]["splits"], val_fraction)
        log.info("Prepared %s: %s", root, json.dumps(manifest["splits"]))
        return manifest

    return ranks.on_first(finish)


def _standing_build(
    datasets: Datasets, root: Path, built_with: BuildOptions, request: dict
) -> tuple[dict | None, dict[str, Corpus] | None, Path | None]:
    """On the first process: an existing build that stands (its manifest), or the listed corpora and a scratch
    folder for a new one, once ``root``'s outputs are claimed as this build's."""
    remove_leftover_scratch(root)
    try:
        corpora = {name: resolve_sources(d["sources"], built_with.text_field) for name, d in datasets.items()}
    except SourcesNotFound:
        if not any_source_found(every_source(datasets)) and (served := build_of_absent_sources(root, request)):
            return record_weights(root, served, datasets), None, None
        raise
    add_listings(request, corpora)
    if manifest := existing_build(root, request, listing_of(corpora), built_with.overwrite):
        return record_weights(root, manifest, datasets), None, None
    claim_outputs(root, [name for name in datasets if name], built_with.tokenizer)
    return None, corpora, new_scratch(root)


def _finish_dataset(
    root: Path, name: str, tokenizer: Tokenizer, bounds: DocumentBounds, request: dict, counts: tuple
) -> dict[str, Any]:
    """A dataset's manifest and next-line task, in its folder; a mixture's dataset gets a manifest of its own
    there (for reading it alone), a single corpus's becomes the build's."""
    folder = root / name
    own_request = request if name == SINGLE else {"sources": request["mixture"][name]["sources"]}
    manifest = manifest_of(own_request, tokenizer, bounds, root, *counts, [], 0.0)
    write_next_line_task(folder, tokenizer, bounds.bos)
    if name != SINGLE:
        write_json_atomic(folder / "manifest.json", manifest)
    return manifest
