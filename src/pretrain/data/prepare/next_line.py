"""A multiple-choice task any corpus gives, with no download: which line comes next?

Written by preparation from the validation documents only (the model never trains on them): the context is
a few consecutive lines of a document; the choices are the line that follows them and three lines of other
validation documents of about the same length; the order is shuffled, seeded. Chance is 25%; a model that
has learned the corpus's structure (indentation, names in scope, how sentences go on) does better. A line
longer than ``MAX_CHARS`` (prose with a paragraph a line, text without line breaks) is taken in pieces of
whole words, so every corpus with documents of a few lines' length gives questions.
"""

from __future__ import annotations

import bisect
import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer

from pretrain.data.shards import iter_documents

TASK_PATH = Path("evals") / "next_line.jsonl"  # inside a build folder
CONTEXT_LINES = 4
DISTRACTORS = 3
QUESTIONS = 1000
MIN_CHARS, MAX_CHARS = 8, 200  # the lines asked about
PIECE_CHARS = 80  # a longer line is cut at spaces into pieces of about this many characters
POOL_LINES = 50_000  # candidate lines read, at most: a large validation split is sampled, not read whole


def segments(text: str) -> list[tuple[str, str]]:
    """The document as (separator, line) pairs, ``"".join(separator + line)`` giving it back exactly: lines
    after a line break; pieces of long lines after the space they were cut at."""
    out = []
    for number, line in enumerate(text.split("\n")):
        separator = "\n" if number else ""
        if len(line) <= MAX_CHARS:
            out.append((separator, line))
            continue
        piece: list[str] = []
        for word in line.split(" "):
            if piece and len(" ".join(piece)) + 1 + len(word) > PIECE_CHARS:
                out.append((separator, " ".join(piece)))
                separator, piece = " ", []
            piece.append(word)
        out.append((separator, " ".join(piece)))
    return out


def next_line_questions(documents: Iterator[str], questions: int = QUESTIONS, seed: int = 0) -> list[dict]:
    """Up to ``questions`` questions, ``{"context", "choices", "answer"}``, from ``documents`` in their order
    (a build stores them in a hashed order, so the first ones are a fair sample)."""
    rng = random.Random(seed)
    sites, pool = [], []  # (document, index, its segments); (length, document, line) of every candidate line
    for number, text in enumerate(documents):
        parts = segments(text)
        candidates = [i for i, (_, line) in enumerate(parts) if _askable(line)]
        pool += [(len(parts[i][1]), number, parts[i][1]) for i in candidates]
        sites += [(number, i, parts) for i in candidates if i >= CONTEXT_LINES]
        if len(pool) >= POOL_LINES:
            break
    pool.sort()
    made = []
    for document, index, parts in rng.sample(sites, min(questions, len(sites))):
        answer_line = parts[index][1]
        distractors = _similar_lines(pool, answer_line, document, rng)
        if len(distractors) < DISTRACTORS:
            continue
        choices = [answer_line, *distractors]
        rng.shuffle(choices)
        before = parts[index - CONTEXT_LINES : index + 1]  # the context's lines, then the answer's separator
        context = "".join(separator + line for separator, line in before[:-1]).removeprefix(before[0][0])
        if not context.strip():
            continue  # blank lines alone: nothing to go on (and lm-evaluation-harness refuses such a context)
        made.append({"context": context + before[-1][0], "choices": choices, "answer": choices.index(answer_line)})
    return made


def _askable(line: str) -> bool:
    """Long enough to tell apart, short enough to score."""
    return len(line.strip()) >= MIN_CHARS and len(line) <= MAX_CHARS


def _similar_lines(pool: list[tuple[int, int, str]], line: str, document: int, rng: random.Random) -> list[str]:
    """``DISTRACTORS`` different lines of other documents, drawn among those nearest in length to ``line``."""
    middle = bisect.bisect_left(pool, (len(line),))
    near = pool[max(0, middle - 8 * DISTRACTORS) : middle + 8 * DISTRACTORS]
    options = sorted({text for _, other, text in near if other != document and text.strip() != line.strip()})
    return rng.sample(options, DISTRACTORS) if len(options) >= DISTRACTORS else []


def validation_texts(build: Path, tokenizer: Tokenizer, bos: int | None = None) -> Iterator[str]:
    """The validation split's documents as text, in stored order (the end-of-text token left out, and ``bos``,
    the token the build put before each document, if any)."""
    first = int(bos is not None)
    for ids in iter_documents(build / "val"):
        yield tokenizer.decode(ids[first:-1].tolist(), skip_special_tokens=False)


def write_next_line_task(build: Path, tokenizer: Tokenizer, bos: int | None = None, seed: int = 0) -> Path:
    """``build/evals/next_line.jsonl`` from the build's validation split (``bos``: as ``validation_texts``)."""
    questions = next_line_questions(validation_texts(build, tokenizer, bos), seed=seed)
    return _write_task(build / TASK_PATH, [json.dumps(q, ensure_ascii=False) + "\n" for q in questions])


def write_mixture_task(root: Path, datasets: list[Path]) -> Path:
    """``root/evals/next_line.jsonl``: the datasets' own tasks taken in turn, so a ``limit`` asks of them all."""
    tasks = [(dataset / TASK_PATH).read_text(encoding="utf-8").splitlines(keepends=True) for dataset in datasets]
    return _write_task(root / TASK_PATH, [line for turn in itertools.zip_longest(*tasks) for line in turn if line])


def _write_task(path: Path, lines: list[str]) -> Path:
    """Written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text("".join(lines), encoding="utf-8")
    partial.rename(path)
    return path
