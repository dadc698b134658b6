"""Multiple-choice task files, read into questions exactly as lm-evaluation-harness would pose them.

Two formats, told apart by their fields:

- the generic one, a JSON object a line: ``{"context": str, "choices": [str, ...], "answer": int}``; each
  choice is scored as the continuation of the context exactly as written (the file carries any separator);
- HellaSwag's published JSONL (``activity_label``, ``ctx_a``, ``ctx_b``, ``endings``, ``label``), cleaned and
  joined as lm-evaluation-harness's ``hellaswag`` task does, each ending scored after a space.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretrain.errors import UserError

GENERIC_FIELDS = ("context", "choices", "answer")
HELLASWAG_FIELDS = ("activity_label", "ctx_a", "ctx_b", "endings", "label")


@dataclass(frozen=True)
class Question:
    """One question as scored: each continuation's log-likelihood after ``context``.

    ``lengths`` are lm-evaluation-harness's ``acc_norm`` denominators: the characters of each choice as the
    file gives it, without the separator the task puts before it.
    """

    context: str
    continuations: tuple[str, ...]
    lengths: tuple[int, ...]
    answer: int
    line: int = 0  # in its file, for messages


def read_task(path: str | Path, limit: int | None = None, empty_ok: bool = False) -> list[Question]:
    """The file's first ``limit`` questions (all without one), each checked; a bad line fails the whole file
    with its path and line number, before any scoring. A file without questions is refused unless
    ``empty_ok``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Task file {path} does not exist; give the path of a JSONL file of questions.")
    questions = []
    for number, record in _records(path):
        if limit is not None and len(questions) >= limit:
            break
        try:
            question = _hellaswag(record) if "endings" in record else _generic(record)
            questions.append(dataclasses.replace(question, line=number))
        except ValueError as error:
            raise UserError(f"{path}, line {number}: {error}.") from None
    if not questions and not empty_ok:
        raise UserError(f"Task file {path} holds no questions.")
    return questions


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        lines = path.read_text(encoding="utf-8-sig").split("\n")  # not splitlines(): U+2028 may sit in a string
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}).") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}, line {number} is not JSON ({error.msg}).") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}, line {number} is not a JSON object with {', '.join(GENERIC_FIELDS)}.")
        yield number, record


def _generic(record: dict[str, Any]) -> Question:
    _require(record, GENERIC_FIELDS, "the generic format")
    context, choices = _text(record, "context"), _choices(record["choices"], "choices")
    if context and not context.strip():
        raise ValueError('"context" is only whitespace, which lm-evaluation-harness cannot score; make it empty')
    answer = record["answer"]
    if isinstance(answer, str):
        raise ValueError(f'"answer" is the string {answer!r}; give the index of the right choice, a number')
    return Question(context, choices, tuple(len(c) for c in choices), _answer(answer, choices, "answer"))


def _hellaswag(record: dict[str, Any]) -> Question:
    """lm-evaluation-harness's ``hellaswag`` task: its ``process_docs`` and ``target_delimiter`` (a space)."""
    _require(record, HELLASWAG_FIELDS, "HellaSwag's format")
    endings = tuple(_clean(ending) for ending in _choices(record["endings"], "endings"))
    label, first, second = (_text(record, name) for name in ("activity_label", "ctx_a", "ctx_b"))
    context = _clean(f"{label}: {first} {second.capitalize()}")
    return Question(
        context, tuple(" " + e for e in endings), tuple(map(len, endings)), _answer(record["label"], endings, "label")
    )


def _clean(text: str) -> str:
    """HellaSwag's WikiHow texts carry bracketed markers; removed as lm-evaluation-harness removes them."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _require(record: dict[str, Any], fields: tuple[str, ...], form: str) -> None:
    missing = [name for name in fields if name not in record]
    if missing:
        raise ValueError(f"{', '.join(missing)} missing ({form} needs {', '.join(fields)})")


def _text(record: dict[str, Any], field: str) -> str:
    if not isinstance(record[field], str):
        raise ValueError(f'"{field}" is {type(record[field]).__name__}, not a string')
    return record[field]


def _choices(choices: Any, field: str) -> tuple[str, ...]:
    if not isinstance(choices, list) or len(choices) < 2:
        raise ValueError(f'"{field}" must be a list of at least two strings')
    for index, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice:
            raise ValueError(f'"{field}"[{index}] is not a non-empty string')
    return tuple(choices)


def _answer(answer: Any, choices: tuple[str, ...], field: str) -> int:
    """An index into ``choices`` (HellaSwag's files give it as an integer or a string of digits)."""
    if isinstance(answer, str) and answer.isdigit():
        answer = int(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ValueError(f'"{field}" is {answer!r}, not the index of one of the {len(choices)} choices')
    return answer
