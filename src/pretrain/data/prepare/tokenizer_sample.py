"""The tokenizer of a build: a given one copied (with its companion files), or one trained on a seeded sample of
the training documents."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from tokenizers import Tokenizer

from pretrain.data.prepare.encode import progress_bar, read_with_progress
from pretrain.data.prepare.options import BuildOptions, byte_count
from pretrain.data.prepare.plan import DocumentSplit, share_out, unit_hash
from pretrain.data.prepare.ranks import Ranks
from pretrain.data.prepare.readers import Unit
from pretrain.data.prepare.tokenizer import load_tokenizer, tokenizer_file, train_tokenizer
from pretrain.data.prepare.tokenizer_files import copy_companions

log = logging.getLogger(__name__)


def sample_for_tokenizer(
    plans: list[tuple[list[Unit], DocumentSplit]],
    text_field: str,
    sample_bytes: int,
    scratch: Path,
    ranks: Ranks,
    progress: bool,
) -> Iterator[str]:
    """A seeded sample of the training documents of every plan, about ``sample_bytes`` of text in all.

    Every rank draws its units' part into ``scratch``; rank 0 then reads the parts back in unit order.
    """
    total = sum(unit.text_size for units, _ in plans for unit in units)
    rate = min(1.0, sample_bytes / max(total, 1))
    numbered = [(p, n) for p, (units, _) in enumerate(plans) for n in range(len(units))]
    mine = [numbered[i] for i in share_out([plans[p][0][n] for p, n in numbered], ranks.world_size)[ranks.rank]]

    def draw() -> None:
        scratch.mkdir(parents=True, exist_ok=True)
        with progress_bar([plans[p][0][n] for p, n in mine], ranks, "Sampling for the tokenizer", progress) as bar:
            for p, n in mine:
                units, split = plans[p]
                with open(scratch / f"sample-{p}-{n}.jsonl", "w") as out:
                    for document in read_with_progress(units[n], text_field, bar, _sampled(rate)):
                        if document.text and split.of(document) == "train":
                            out.write(json.dumps(document.text) + "\n")

    ranks.everywhere(draw)

    def texts() -> Iterator[str]:
        for p, n in numbered:
            with open(scratch / f"sample-{p}-{n}.jsonl") as lines:
                yield from (json.loads(line) for line in lines)

    return texts()


def _sampled(rate: float) -> Callable[[str], bool]:
    """Whether a document's key is in the tokenizer's sample: a share ``rate`` of keys, the same on every run."""
    return lambda key: unit_hash(f"tokenizer-sample:{key}") < rate


def make_tokenizer(
    root: Path, tokenizer: str | None, vocab_size: int, sample: Iterator[str] | None, ranks: Ranks
) -> Tokenizer:
    """``root/tokenizer.json``: a copy of the given one (with its companion files), or trained by rank 0 on
    ``sample``; loaded on every rank."""
    path = root / "tokenizer.json"

    def write() -> None:
        if tokenizer:
            if tokenizer_file(tokenizer).resolve() != path.resolve():
                shutil.copyfile(tokenizer_file(tokenizer), path)
            copy_companions(tokenizer, root)
        else:
            log.info("Training a %d-token BPE tokenizer on a sample of the training split", vocab_size)
            train_tokenizer(sample, vocab_size).save(str(path))

    ranks.on_first(write)
    return load_tokenizer(path)


def build_tokenizer(root: Path, plans: list[list[Unit]], options: BuildOptions, scratch: Path) -> Tokenizer:
    """The given tokenizer, or one trained on a sample of the training documents of every plan."""
    sample = None
    if not options.tokenizer:
        split = DocumentSplit(options.val_fraction)
        sample_bytes = byte_count(options.tokenizer_sample_bytes, "tokenizer_sample_bytes")
        sample = sample_for_tokenizer(
            [(units, split) for units in plans],
            options.text_field,
            sample_bytes,
            scratch,
            options.ranks,
            options.progress,
        )
    return make_tokenizer(root, options.tokenizer, options.vocab_size, sample, options.ranks)
