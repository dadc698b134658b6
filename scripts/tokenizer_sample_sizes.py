"""How large a sample the tokenizer needs: train it on samples of several sizes drawn the way preparation
draws them, and compare training time and how well each compresses held-out text (tokens per byte).

    python scripts/tokenizer_sample_sizes.py /tmp/corpus --sizes 16MB 64MB 256MB --vocab-size 4096
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from pretrain.data.prepare.options import byte_count
from pretrain.data.prepare.plan import DocumentSplit, plan_units
from pretrain.data.prepare.ranks import Ranks
from pretrain.data.prepare.readers import read_unit
from pretrain.data.prepare.sources import resolve_sources
from pretrain.data.prepare.tokenizer import train_tokenizer
from pretrain.data.prepare.tokenizer_sample import sample_for_tokenizer

HELD_OUT_BYTES = 20_000_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+")
    parser.add_argument("--sizes", nargs="+", default=["16MB", "64MB", "256MB"])
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--val-fraction", type=float, default=0.02)
    args = parser.parse_args()
    units, split = plan_units(resolve_sources(args.sources).files, args.val_fraction), DocumentSplit(args.val_fraction)
    held_out, held_out_bytes = [], 0
    for unit in units:  # validation documents: never in a sample
        for document in read_unit(unit, "text"):
            if document.text and split.of(document) == "val" and held_out_bytes < HELD_OUT_BYTES:
                held_out.append(document.text)
                held_out_bytes += len(document.text.encode())
    print(f"held-out text: {held_out_bytes:,} bytes\nsample      seconds  tokens per held-out byte")
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as scratch:
            sample = sample_for_tokenizer(
                [(units, split)], "text", byte_count(size, "size"), Path(scratch), Ranks(), progress=False
            )
            started = time.perf_counter()
            tokenizer = train_tokenizer(sample, args.vocab_size)
            seconds = time.perf_counter() - started
        tokens = sum(len(e.ids) for e in tokenizer.encode_batch_fast(held_out, add_special_tokens=False))
        print(f"{size:>8}  {seconds:>9.1f}  {tokens / held_out_bytes:.4f}")


if __name__ == "__main__":
    main()
