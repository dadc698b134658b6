"""How independent the blocks of a training batch are: on three sources of long documents, each in its own
alphabet, the share of each batch's blocks that come from its most frequent source, for the training loader,
for litdata's own shuffle over the same build, and for blocks drawn independently (uniformly, with replacement).

    python scripts/batch_mixing.py /tmp/mixing --megabytes 80 --chunk-bytes 2MB
"""

from __future__ import annotations

import argparse
import random
import statistics
from collections.abc import Iterable
from pathlib import Path

import torch
from litdata import StreamingDataLoader, StreamingDataset
from litdata.streaming.item_loader import TokensLoader
from tokenizers import Tokenizer

from pretrain.data import PretrainData
from pretrain.data.block_reader import BlockReader
from pretrain.data.prepare.build import prepare

ALPHABETS = {"books": "abcdefgh", "code": "ijklmnop", "web": "qrstuvwx"}


def write_corpus(root: Path, megabytes: int, document_words: int) -> None:
    """Three sources of equal size, documents of ``document_words`` words (about 3.5 tokens each at vocab 4096)."""
    rng = random.Random(0)
    per_source = megabytes * 1_000_000 // 3
    for name, alphabet in ALPHABETS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        written, n = 0, 0
        while written < per_source:
            text = " ".join("".join(rng.choices(alphabet, k=rng.randint(2, 7))) for _ in range(document_words))
            (root / name / f"{n:05d}.txt").write_text(text)
            written, n = written + len(text), n + 1


def source_of(text: str) -> str:
    return max(ALPHABETS, key=lambda name: sum(text.count(c) for c in ALPHABETS[name]))


def largest_shares(batches: Iterable[torch.Tensor], decode, count: int) -> list[float]:
    shares = []
    for _, batch in zip(range(count), batches, strict=False):
        origins = [source_of(decode(block.tolist())) for block in batch]
        shares.append(max(origins.count(name) for name in ALPHABETS) / len(origins))
    return shares


def independent_draws(data_dir: Path, block_len: int, batch_size: int, count: int, seed: int) -> list[torch.Tensor]:
    reader, rng = BlockReader([data_dir / "train"], block_len), random.Random(seed)
    return [torch.stack([reader[rng.randrange(len(reader))] for _ in range(batch_size)]) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="where the corpus and its build go")
    parser.add_argument("--megabytes", type=int, default=80)
    parser.add_argument("--document-words", type=int, default=6000)
    parser.add_argument("--chunk-bytes", default="2MB")
    parser.add_argument("--seq-len", type=int, default=255)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 7, 1])
    args = parser.parse_args()

    corpus, data_dir = args.folder / "corpus", args.folder / "data"
    if not corpus.is_dir():
        write_corpus(corpus, args.megabytes, args.document_words)
    prepare([str(corpus / name) for name in ALPHABETS], str(data_dir), chunk_bytes=args.chunk_bytes, progress=True)
    decode = Tokenizer.from_file(str(data_dir / "tokenizer.json")).decode
    block_len = args.seq_len + 1
    print(f"largest single-source share per batch of {args.batch_size}, first {args.batches} batches")
    print(f"{'order':<22}{'seed':>6}{'mean':>8}{'median':>8}{'max':>8}")
    for seed in args.seeds:
        data = PretrainData(
            data_dir=str(data_dir), seq_len=args.seq_len, batch_size=args.batch_size, num_workers=0, seed=seed
        )
        data.setup("fit")
        litdata = StreamingDataset(
            str(data_dir / "train"),
            item_loader=TokensLoader(block_size=block_len),
            shuffle=True,
            drop_last=True,
            seed=seed,
        )
        orders = {
            "training loader": data.train_dataloader(),
            "litdata shuffle": StreamingDataLoader(litdata, batch_size=args.batch_size, num_workers=0),
            "independent draws": independent_draws(data_dir, block_len, args.batch_size, args.batches, seed),
        }
        for name, batches in orders.items():
            shares = largest_shares(batches, decode, args.batches)
            print(
                f"{name:<22}{seed:>6}{statistics.mean(shares):>8.3f}{statistics.median(shares):>8.3f}"
                f"{max(shares):>8.3f}"
            )


if __name__ == "__main__":
    main()
