"""Write a seeded corpus of any size from the standard library's text, for measuring preparation at scale.

    python scripts/make_corpus.py /tmp/corpus --gigabytes 1.3

Three sources, laid out like a team's corpus: ``web/`` (JSONL files of short documents), ``code/`` (one
large JSONL file) and ``books/`` (text files, some larger than one piece). Documents are slices of the
standard library's source at random places and lengths (log-normal, median ~2 KB), so the text
tokenizes like real code and prose, and no two documents are alike.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterator
from pathlib import Path

from pretrain.data.prepare.sources import stdlib_files

SHARES = {"web": 0.5, "code": 0.3, "books": 0.2}
WEB_FILE_BYTES = 256 * 2**20
BOOK_BYTES = (2 * 2**20, 40 * 2**20)


def stdlib_text() -> str:
    return "".join(Path(file.path).read_text(errors="replace") for file in stdlib_files())


def documents(text: str, rng: random.Random) -> Iterator[str]:
    """Endless slices of ``text``."""
    while True:
        length = min(int(rng.lognormvariate(7.6, 1.0)) + 16, len(text) // 2)
        start = rng.randrange(len(text) - length)
        yield text[start : start + length]


def write_jsonl(path: Path, budget: int, stream: Iterator[str]) -> int:
    written = 0
    with open(path, "w") as out:
        while written < budget:
            line = json.dumps({"text": next(stream)}) + "\n"
            out.write(line)
            written += len(line)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--gigabytes", type=float, default=1.3, help="total size (1 GB = 1e9 bytes)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng, total = random.Random(args.seed), int(args.gigabytes * 1e9)
    stream = documents(stdlib_text(), rng)
    for name in SHARES:
        (args.out / name).mkdir(parents=True, exist_ok=True)
    budget, part = int(total * SHARES["web"]), 0
    while budget > 0:
        budget -= write_jsonl(args.out / "web" / f"part-{part:03d}.jsonl", min(budget, WEB_FILE_BYTES), stream)
        part += 1
    write_jsonl(args.out / "code" / "all.jsonl", int(total * SHARES["code"]), stream)
    budget, book = int(total * SHARES["books"]), 0
    while budget > 0:
        size = min(budget, rng.randint(*BOOK_BYTES))
        text = "".join(next(stream) for _ in range(size // 2000 + 1))[:size]
        (args.out / "books" / f"book-{book:03d}.txt").write_text(text)
        budget -= len(text.encode())
        book += 1
    print(f"{args.out}: {sum(p.stat().st_size for p in args.out.rglob('*') if p.is_file()):,} bytes")


if __name__ == "__main__":
    main()
