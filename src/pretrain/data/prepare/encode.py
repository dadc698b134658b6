"""Reading and encoding: each process's units read with a progress bar, encoded in batches on a thread of
their own, and dealt to buckets."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from pretrain.data.prepare.buckets import BucketFiles
from pretrain.data.prepare.options import token_dtype
from pretrain.data.prepare.plan import DocumentSplit
from pretrain.data.prepare.ranks import Ranks
from pretrain.data.prepare.readers import RawDocument, Unit, read_unit
from pretrain.data.prepare.tokenizer import DocumentBounds

log = logging.getLogger(__name__)

# Text per encode_batch call: enough documents to keep every core busy (about 35 MB of memory per 1M characters).
ENCODE_BATCH_CHARS = max(4_000_000, 1_000_000 * (os.cpu_count() or 1))


def progress_bar(units: list[Unit], ranks: Ranks, desc: str, show: bool) -> tqdm:
    """Bytes read by this process of its ``units`` (rank 0 shows its own; the others share the work alike)."""
    label = desc if ranks.world_size == 1 else f"{desc} (rank 0 of {ranks.world_size})"
    return tqdm(
        total=sum(unit.size for unit in units),
        unit="B",
        unit_scale=True,
        desc=label,
        disable=not (show and ranks.first),
    )


def read_with_progress(
    unit: Unit, text_field: str, bar: tqdm, wanted: Callable[[str], bool] | None = None
) -> Iterator[RawDocument]:
    """The unit's documents, moving ``bar`` by the bytes read (inside a file, not file by file)."""
    read = 0
    for document in read_unit(unit, text_field, wanted):
        now = min(document.read, unit.size)  # the last line of a byte range may run past its end
        bar.update(max(now - read, 0))
        read = max(read, now)
        yield document
    bar.update(unit.size - read)


def encode_units(
    units: list[Unit],
    numbers: list[int],
    split: DocumentSplit,
    text_field: str,
    tokenizer: Tokenizer,
    bounds: DocumentBounds,
    buckets: BucketFiles,
    bar: tqdm,
) -> Counter:
    """Encode this process's units into its part of every bucket, each document between ``bounds``; returns the
    noted events.

    A batch is encoded on a thread of its own (the tokenizer's cores, without the GIL) while this one
    reads the next batch and files the one before into the buckets.
    """
    dtype, first = token_dtype(tokenizer.get_vocab_size()), int(bounds.bos is not None)  # ids before the text
    tokenizer.encode_special_tokens = True  # "<|endoftext|>" inside a document is text, not a document break
    events, pending, pending_chars = Counter(), [], 0

    def file_away(batch: list[tuple], encodings: Future) -> None:
        for (name, text, unit, ordinal), encoding in zip(batch, encodings.result(), strict=True):
            ids = np.empty(len(encoding.ids) + first + 1, dtype=dtype)
            if first:
                ids[0] = bounds.bos
            ids[first:-1], ids[-1] = encoding.ids, bounds.eos
            buckets.add(name, text, unit, ordinal, ids)
        buckets.flush()

    with ThreadPoolExecutor(max_workers=1) as encoder:
        in_flight: tuple[list[tuple], Future] | None = None

        def flush() -> None:
            nonlocal in_flight, pending
            batch, pending = pending, []
            # Ids alone, without the character offsets training never reads.
            encodings = encoder.submit(
                tokenizer.encode_batch_fast, [text for _, text, _, _ in batch], add_special_tokens=False
            )
            if in_flight is not None:
                file_away(*in_flight)
            in_flight = (batch, encodings)

        for number in numbers:
            for ordinal, document in enumerate(read_with_progress(units[number], text_field, bar)):
                if document.text is None:
                    events["malformed"] += 1
                elif not document.text:
                    events["empty"] += 1
                else:
                    events["invalid_utf8"] += document.replaced_invalid_utf8
                    events["pieces"] += document.piece is not None
                    pending.append((split.of(document), document.text, number, ordinal))
                    pending_chars += len(document.text)
                    if pending_chars >= ENCODE_BATCH_CHARS:
                        flush()
                        pending_chars = 0
        flush()
        file_away(*in_flight)
    return events
