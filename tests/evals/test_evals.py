"""Multiple-choice evals: task files and their errors, tokenization and scoring as lm-evaluation-harness does
them, the next-line task preparation writes, and the callback in a training run and in ``validate``."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from pretrain.data.prepare.next_line import PIECE_CHARS, TASK_PATH, next_line_questions, segments, validation_texts
from pretrain.data.shards import iter_documents
from pretrain.errors import UserError
from pretrain.evals.callback import MultipleChoice
from pretrain.evals.scoring import (
    batch_of,
    choice_scores,
    count_correct,
    encode_pairs,
    scoring_rows,
    shared_row,
    single_row,
    token_loglikelihoods,
)
from pretrain.evals.tasks import Question, read_task
from pretrain.model.config import LlamaConfig
from pretrain.model.llama import Llama
from tests.helpers.host_reads import HostReads
from tests.helpers.resume import TRAINED_STEPS
from tests.helpers.runs import assert_ok, scalars_by_step, scalars_tags, tiny_fit_args


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_generic_questions_are_read_as_written(tmp_path: Path) -> None:
    task = write_lines(
        tmp_path / "t.jsonl",
        json.dumps({"context": "Q: 2+2?\nA:", "choices": [" 4", " 5"], "answer": 0}),
        "",
        json.dumps({"context": "", "choices": ["yes", "no", "maybe"], "answer": 2}),
    )
    assert read_task(task) == [
        Question("Q: 2+2?\nA:", (" 4", " 5"), (2, 2), 0, line=1),
        Question("", ("yes", "no", "maybe"), (3, 2, 5), 2, line=3),
    ]
    assert len(read_task(task, limit=1)) == 1


def test_hellaswag_records_are_read_as_lm_evaluation_harness_reads_them(tmp_path: Path) -> None:
    record = {
        "activity_label": "Hair",
        "ctx_a": "[header] Dye [title] Wash.",
        "ctx_b": "[step] USE the",
        "endings": ["[substeps] gentle.  [title] Rinse.", "a towel."],
        "label": "1",
    }
    (question,) = read_task(write_lines(tmp_path / "hs.jsonl", json.dumps(record)))
    # The context's second part capitalized (the rest lowered), bracketed markers removed, " [title]" a full stop.
    assert question.context == "Hair: Dye. Wash. use the"
    assert question.continuations == ("  gentle. . Rinse.", " a towel.")  # after lm-eval's space
    assert question.lengths == (len(" gentle. . Rinse."), len("a towel."))  # acc_norm: the choice alone
    assert question.answer == 1


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"line 2 is not JSON"),
        ("[1, 2]", r"line 2 is not a JSON object"),
        ('{"context": "a", "choices": ["x", "y"]}', r"line 2: answer missing"),
        ('{"context": "a", "choices": ["x", "y"], "answer": 2}', r"line 2: \"answer\" is 2, not the index"),
        ('{"context": "a", "choices": ["x"], "answer": 0}', r"line 2: \"choices\" must be a list of at least two"),
        ('{"context": "a", "choices": ["x", ""], "answer": 0}', r"line 2: \"choices\"\[1\] is not a non-empty"),
        ('{"context": 3, "choices": ["x", "y"], "answer": 0}', r"line 2: \"context\" is int"),
        ('{"endings": ["x", "y"], "label": 0}', r"line 2: activity_label, ctx_a, ctx_b missing"),
        (
            '{"activity_label": "a", "ctx_a": "b", "ctx_b": null, "endings": ["x", "y"], "label": 0}',
            r"line 2: \"ctx_b\" is NoneType, not a string",
        ),
        ('{"context": "a", "choices": ["x", "y"], "answer": "1"}', r"line 2: \"answer\" is the string '1'"),
        ('{"context": " \\n ", "choices": ["x", "y"], "answer": 0}', r"line 2: \"context\" is only whitespace"),
    ],
)
def test_a_bad_line_is_named_with_its_file_and_number(tmp_path: Path, line: str, message: str) -> None:
    task = write_lines(tmp_path / "t.jsonl", '{"context": "a", "choices": ["x", "y"], "answer": 1}', line)
    with pytest.raises(UserError, match=f"{tmp_path / 't.jsonl'}, {message}"):
        read_task(task)


def test_a_missing_empty_or_undecodable_task_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        read_task(tmp_path / "absent.jsonl")
    with pytest.raises(UserError, match="holds no questions"):
        read_task(write_lines(tmp_path / "empty.jsonl", ""))
    (tmp_path / "latin1.jsonl").write_bytes(
        '{"context": "caf\u00e9", "choices": ["x", "y"], "answer": 0}'.encode("latin-1")
    )
    with pytest.raises(UserError, match=r"latin1.jsonl is not UTF-8 text"):
        read_task(tmp_path / "latin1.jsonl")


def test_pairs_split_as_lm_evaluation_harness_splits_them(prepared: Path) -> None:
    tokenizer = Tokenizer.from_file(str(prepared / "tokenizer.json"))
    eos = tokenizer.token_to_id("<|endoftext|>")
    (context, continuation), (empty_context, alone) = encode_pairs(tokenizer, [("The cat ", "sees"), ("", " a")], eos)
    # The trailing space moves to the continuation; the two are encoded together and split at the context's end.
    assert context == tokenizer.encode("The cat").ids
    assert context + continuation == tokenizer.encode("The cat sees").ids
    assert (empty_context, alone) == ([eos], tokenizer.encode(" a").ids)  # no context: the prefix token


def test_rows_keep_the_continuation_and_cut_the_context_from_the_left(prepared: Path) -> None:
    tokenizer = Tokenizer.from_file(str(prepared / "tokenizer.json"))
    question = Question("the cat " * 40, ("sees", "eats a big tree"), (4, 15), 1)
    rows = scoring_rows([question], tokenizer, 16, 0)
    assert len(rows) == 2  # cut to fit, the contexts differ: each choice has a row of its own
    for row in rows:
        (choice,) = {choice for choice, _, _ in row.scored}
        assert len(row.tokens) == 16 and row.positions == list(range(16)) and set(row.branches) == {0}
        whole = tokenizer.encode(question.context.rstrip() + " " + question.continuations[choice]).ids
        assert row.tokens + whole[-1:] == whole[-17:]  # max_length + 1 tokens, the last one dropped
        targets = [target for _, _, target in row.scored]
        assert targets == whole[len(whole) - len(targets) :]
        assert all((row.tokens + whole[-1:])[at + 1] == target for _, at, target in row.scored)
    with pytest.raises(UserError, match=r"^mine.jsonl, line 7: choice 1 is \d+ tokens .* each must be 1 to 2 tokens"):
        scoring_rows([dataclasses.replace(question, line=7)], tokenizer, 2, 0, "mine.jsonl")


def test_a_question_s_choices_share_one_row_when_they_fit(prepared: Path) -> None:
    tokenizer = Tokenizer.from_file(str(prepared / "tokenizer.json"))
    question = Question("The cat ", ("sees", "eats a big tree", "x"), (4, 15, 1), 1)
    (row,) = scoring_rows([question], tokenizer, 64, 0)
    for choice, text in enumerate(question.continuations):
        whole = tokenizer.encode("The cat " + text).ids
        context = tokenizer.encode("The cat").ids
        # What the choice's branch sees, at the positions it would have alone, predicts what it would predict.
        seen = [i for i, branch in enumerate(row.branches) if branch in (0, choice + 1)]
        assert [row.tokens[i] for i in seen] == whole[:-1]
        assert [row.positions[i] for i in seen] == list(range(len(whole) - 1))
        scored = [(at, target) for c, at, target in row.scored if c == choice]
        assert [target for _, target in scored] == whole[len(context) :]
        assert [row.tokens[i] for i in seen].index(row.tokens[scored[0][0]]) == len(context) - 1


TINY = LlamaConfig(vocab_size=50, seq_len=24, d_model=32, n_layer=2, n_head=4, n_kv_head=2, ffn_dim=48)


def test_shared_rows_score_each_choice_as_it_scores_alone() -> None:
    """Rows of both kinds and lengths in one padded batch: each choice's summed log-probability equals that of
    its own sequence, run alone through the model."""
    torch.manual_seed(0)
    model = Llama(TINY).eval()
    model.init_weights(0)
    generator = torch.Generator().manual_seed(3)

    def tokens(count: int) -> list[int]:
        return torch.randint(1, TINY.vocab_size, (count,), generator=generator).tolist()

    questions = [
        (tokens(5), [tokens(3), tokens(1), tokens(6)]),
        (tokens(11), [tokens(2), tokens(4)]),
        (tokens(30), [tokens(4), tokens(2)]),
    ]
    rows = [shared_row(0, *questions[0]), shared_row(1, *questions[1])]
    rows += [
        single_row(2, choice, questions[2][0], continuation, TINY.seq_len)  # the context cut to fit
        for choice, continuation in enumerate(questions[2][1])
    ]
    scores = torch.zeros(3, 3)
    with torch.no_grad():
        batch = batch_of(rows)
        choice_scores(token_loglikelihoods(model, batch), batch.places, scores)
        for number, (context, continuations) in enumerate(questions):
            for choice, continuation in enumerate(continuations):
                whole = (context + continuation)[-(TINY.seq_len + 1) :]
                log_probs = model(torch.tensor([whole[:-1]]))[0].log_softmax(-1)
                alone = sum(log_probs[len(whole) - 1 - len(continuation) + i, t] for i, t in enumerate(continuation))
                torch.testing.assert_close(scores[number, choice], alone, atol=1e-5, rtol=1e-5)


def test_counts_take_the_first_of_tied_choices_and_normalize_by_characters() -> None:
    inf = float("inf")
    scores = torch.tensor([[-2.0, -2.0, -inf], [-6.0, -4.0, -9.0], [-3.0, -5.0, -inf]])
    lengths = torch.tensor([[1.0, 1.0, 1.0], [6.0, 2.0, 10.0], [1.0, 5.0, 1.0]])
    answers = torch.tensor([0, 2, 1])
    # acc: choices 0, 1, 0 -> one right; acc_norm: -2/1 tie -> 0; -0.9 -> 2; -1 vs -3 -> 1 -> three right.
    assert count_correct(scores, lengths, answers).tolist() == [1, 3]


def test_next_line_questions_come_from_the_documents_with_distractors_of_other_documents() -> None:
    documents = [
        "\n".join(f"doc {d} line {i} {'x' * (i % 7)}" for i in range(30)) for d in range(6)
    ]  # every line names its document
    questions = next_line_questions(iter(documents), questions=50, seed=3)
    assert len(questions) == 50
    assert questions == next_line_questions(iter(documents), questions=50, seed=3)  # seeded
    answers = set()
    for question in questions:
        context_lines = question["context"].removesuffix("\n").split("\n")
        document = context_lines[-1].split()[1]
        true_line = question["choices"][question["answer"]]
        assert true_line.startswith(f"doc {document} line {int(context_lines[-1].split()[3]) + 1} ")
        others = [c for i, c in enumerate(question["choices"]) if i != question["answer"]]
        assert len(others) == 3 and all(c.split()[1] != document for c in others)
        assert all(abs(len(c) - len(true_line)) <= 6 for c in others)  # of similar length
        answers.add(question["answer"])
    assert answers == {0, 1, 2, 3}  # the true line is not always in one place


def test_long_lines_are_asked_about_in_pieces_of_whole_words() -> None:
    words = [f"word{i}" for i in range(200)]
    text = "short first line\n" + " ".join(words) + "\n\nlast"
    parts = segments(text)
    assert "".join(separator + line for separator, line in parts) == text
    assert [separator for separator, _ in parts[:3]] == ["", "\n", " "]
    assert all(len(line) <= PIECE_CHARS for _, line in parts)
    documents = [" ".join(f"d{d}w{i}" for i in range(300)) for d in range(5)]  # one line each, no line break
    questions = next_line_questions(iter(documents), questions=20)
    assert len(questions) == 20
    for question in questions:
        assert question["context"].endswith(" ")  # the space the true piece followed
        document = question["context"].split("w")[0]
        assert (question["context"] + question["choices"][question["answer"]]) in documents[int(document[1:])]


def test_a_mixture_task_asks_of_every_dataset_in_turn(built: Path) -> None:
    per_dataset = [(built / name / TASK_PATH).read_text().splitlines() for name in ("letters", "digits")]
    assert all(per_dataset)
    mixed = (built / TASK_PATH).read_text().splitlines()
    letters, digits = per_dataset
    assert mixed[:2] == [letters[0], digits[0]] and sorted(mixed) == sorted(letters + digits)


def test_preparation_writes_the_next_line_task_from_validation_documents_only(prepared: Path) -> None:
    tokenizer = Tokenizer.from_file(str(prepared / "tokenizer.json"))
    held_out = "\n".join(validation_texts(prepared, tokenizer))
    training = "\n".join(tokenizer.decode(ids[:-1].tolist()) for ids in iter_documents(prepared / "train"))
    questions = read_task(prepared / TASK_PATH)
    assert len(questions) > 20
    for question in questions:
        true_line = question.continuations[question.answer]
        assert question.context + true_line in held_out  # the context and the line that follows it
        assert all(choice in held_out for choice in question.continuations)
        assert question.context not in training


def test_the_callback_scores_in_training_and_in_validate(corpus, prepared: Path, tmp_path: Path, run_cli) -> None:
    result = run_cli(*tiny_fit_args(corpus[0], prepared, tmp_path, "--trainer.max_steps", "20"))
    assert_ok(result)
    run_dir = tmp_path / "quickstart" / "version_0"
    acc = scalars_by_step(run_dir, "eval/next_line/acc")
    acc_norm = scalars_by_step(run_dir, "eval/next_line/acc_norm")
    assert list(acc) == list(acc_norm) == [19]  # the validation at step 20 (no sanity-check scoring)
    questions = len(read_task(prepared / TASK_PATH))
    assert round(acc[19] * questions) == pytest.approx(acc[19] * questions, abs=1e-3)  # a count over the task
    args = tiny_fit_args(corpus[0], prepared, tmp_path)
    args[0] = "validate"
    result = run_cli(*args, "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"))
    assert_ok(result)
    printed = re.search(r"eval/next_line/acc\W+([0-9.]+)", result.stdout)
    assert printed and float(printed.group(1)) == pytest.approx(acc[19], abs=1e-6), result.stdout  # same weights


def test_a_bad_task_file_stops_the_run_before_training(corpus, prepared: Path, tmp_path: Path, run_cli) -> None:
    task = write_lines(tmp_path / "bad.jsonl", '{"context": "a", "choices": ["x", "y"], "answer": 5}')
    config = tmp_path / "evals.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: pretrain.evals.MultipleChoice\n"
        f"      init_args:\n        tasks: {{mine: {task}}}\n"
    )
    result = run_cli(*tiny_fit_args(corpus[0], prepared, tmp_path), "--config", str(config))
    assert result.returncode == 2
    assert f'error: {task}, line 1: "answer" is 5, not the index of one of the 2 choices.' in result.stderr
    assert not (tmp_path / "quickstart" / "version_0" / "checkpoints").exists()


def test_scoring_every_n_validations_on_the_first_questions(corpus, prepared: Path, tmp_path: Path, run_cli) -> None:
    config = tmp_path / "evals.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: pretrain.evals.MultipleChoice\n      init_args:\n"
        '        tasks: {first: "{data_dir}/evals/next_line.jsonl"}\n        limit: 4\n'
        "        every_n_validations: 2\n"
    )
    result = run_cli(*tiny_fit_args(corpus[0], prepared, tmp_path, "--config", str(config)))  # validates at 20, 40
    assert_ok(result)
    acc = scalars_by_step(tmp_path / "quickstart" / "version_0", "eval/first/acc")
    assert list(acc) == [39] and acc[39] * 4 == pytest.approx(round(acc[39] * 4), abs=1e-6)


def test_compare_validates_checkpoints_as_their_run_was_configured(trained: Path, run_cli) -> None:
    checkpoints = trained / "checkpoints"
    newest, last = str(checkpoints / f"step={TRAINED_STEPS:07d}.ckpt"), str(checkpoints / "last.ckpt")
    result = run_cli("compare", newest, last)
    assert_ok(result)
    header, _, *rows = result.stdout.strip().splitlines()[-4:]
    assert header == "| checkpoint | step | val/loss | val/bpb | eval/next_line/acc | eval/next_line/acc_norm |"
    logged = [scalars_by_step(trained, tag) for tag in ("val/loss", "val/bpb", "eval/next_line/acc")]
    for row, path in zip(rows, (newest, last), strict=True):
        step = TRAINED_STEPS
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[:2] == [path, str(step)]
        # The same weights and held-out batches as the run's own validation at that step.
        assert [float(cell) for cell in cells[2:5]] == pytest.approx([m[step - 1] for m in logged], abs=1e-4)
    assert sorted(p.name for p in trained.iterdir() if p.is_dir()) == ["checkpoints"]  # nothing written


def test_compare_names_a_checkpoint_without_its_run(tmp_path: Path, run_cli) -> None:
    (tmp_path / "loose.ckpt").write_bytes(b"")
    result = run_cli("compare", str(tmp_path / "loose.ckpt"))
    assert result.returncode == 2 and "No config.yaml of the run beside" in result.stderr
    result = run_cli("compare", str(tmp_path / "absent.ckpt"))
    assert result.returncode == 2 and "absent.ckpt does not exist" in result.stderr


def test_scoring_reads_nothing_back_until_the_counts_are_logged(
    corpus, prepared: Path, trained: Path, tmp_path: Path, run_cli, monkeypatch
) -> None:
    """On a GPU each read (or a number made into a tensor) waits for every queued kernel."""
    reads, scored = HostReads(), []
    score = MultipleChoice.correct

    def recorded(self, *args):
        reads.step = "eval"
        with reads:
            scored.append(score(self, *args))
        reads.step = None
        return scored[-1]

    monkeypatch.setattr(MultipleChoice, "correct", recorded)
    args = tiny_fit_args(corpus[0], prepared, tmp_path)
    args[0] = "validate"
    result = run_cli(*args, "--ckpt_path", str(trained / "checkpoints" / "last.ckpt"))
    assert_ok(result)
    assert len(scored) == 1 and reads.by_step == {}


def test_test_scores_every_configured_task(corpus, prepared: Path, trained: Path, tmp_path: Path, run_cli) -> None:
    config = tmp_path / "two.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n"
        + "".join(
            f"    - class_path: pretrain.evals.MultipleChoice\n      init_args:\n        tasks: {{{name}: "
            f'"{{data_dir}}/evals/next_line.jsonl"}}\n        limit: {limit}\n'
            for name, limit in (("first", 5), ("more", 20))
        )
    )  # two callbacks: each keeps its own state in checkpoints
    args = tiny_fit_args(corpus[0], prepared, tmp_path, "--config", str(config))
    args[0] = "test"
    result = run_cli(*args, "--ckpt_path", str(trained / "checkpoints" / "last.ckpt"))
    assert_ok(result)
    assert "eval/first/acc_norm" in result.stdout and "eval/more/acc_norm" in result.stdout


def test_a_build_without_next_line_questions_trains_without_the_task(
    corpus, prepared: Path, tmp_path: Path, run_cli
) -> None:
    """A corpus may give no question (a validation split of one document, of one-line documents): the run
    warns and goes on; a task file the config names itself must hold questions."""
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    (data / TASK_PATH).write_text("")
    result = run_cli(*tiny_fit_args(corpus[0], data, tmp_path, "--trainer.max_steps", "20"))
    assert_ok(result)
    assert "holds no questions (too few held-out documents" in result.stderr
    assert not any(tag.startswith("eval/") for tag in scalars_tags(tmp_path / "quickstart" / "version_0"))
