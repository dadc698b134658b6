"""The callback's accuracy equals lm-evaluation-harness's on the exported model, for the same files: the
generic format through the shipped task YAML, HellaSwag's format through lm-evaluation-harness's own
``hellaswag`` task read from a local file. Also: scoring shared over two processes counts the same."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
import torch
import yaml

from pretrain.checkpointing.loading import load_checkpoint, load_model, load_tokenizer_from_checkpoint
from pretrain.commands.export import export
from pretrain.data.prepare.next_line import TASK_PATH
from pretrain.evals.scoring import batch_of, choice_scores, scoring_rows, token_loglikelihoods
from pretrain.evals.tasks import read_task
from tests.helpers.runs import ROOT, assert_ok, run_main, scalars_by_step, tiny_fit_args

HELLASWAG = [  # HellaSwag's published fields; WikiHow-style markers, a label given as a string; short (seq_len 64)
    {
        "activity_label": "Ice",
        "ctx_a": "The man writes.",
        "ctx_b": "then",
        "label": 3,
        "endings": [", he adds wax.", ", a ski lift.", ", the coat.", ", he goes on."],
    },
    {
        "activity_label": "Baking",
        "ctx_a": "A chef shows pans.",
        "ctx_b": "the PANS",
        "label": "3",
        "endings": ["hold eggs.", "get sugar.", "are placed.", "are filled."],
    },
    {
        "activity_label": "Hair",
        "ctx_a": "[header] Dye [title] Wash.",
        "ctx_b": "[step] Use",
        "label": 0,
        "endings": ["[substeps] gentle. [title] Rinse.", "then  dry [step] it.", "a towel.", "oily hair."],
    },
    {
        "activity_label": "Cat",
        "ctx_a": "The cat sees a bird.",
        "ctx_b": "it",
        "label": 1,
        "endings": ["eats the tree.", "likes the bird.", "runs under the house quickly.", "a."],
    },
]


def lm_eval_tasks(folder: Path, generic: Path, hellaswag: Path) -> None:
    """The shipped generic task pointed at ``generic``; lm-evaluation-harness's hellaswag task at ``hellaswag``."""
    config = yaml.safe_load((ROOT / "configs" / "lm-eval" / "next_line.yaml").read_text())
    config["dataset_kwargs"]["data_files"]["test"] = str(generic)
    (folder / "next_line.yaml").write_text(yaml.safe_dump(config))
    own = Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "hellaswag.yaml"
    (folder / "hellaswag_local.yaml").write_text(
        yaml.safe_dump(
            {
                "include": str(own),
                "task": "hellaswag_local",
                "dataset_path": "json",
                "dataset_name": None,
                "dataset_kwargs": {"data_files": {"validation": str(hellaswag)}},
                "training_split": None,
                "validation_split": "validation",
            }
        )
    )


def run_lm_eval(exported: Path, tasks: Path, out: Path) -> tuple[dict, dict[str, list]]:
    """lm-evaluation-harness's command, offline: its results and, per task, each question's choice scores."""
    env = {**os.environ, "HF_HOME": str(out / "hf-home"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        str(Path(sys.executable).parent / "lm_eval"),
        "--model",
        "hf",
        "--model_args",
        f"pretrained={exported},dtype=float32",
        "--include_path",
        str(tasks),
        "--tasks",
        "next_line,hellaswag_local",
        "--device",
        "cpu",
        "--batch_size",
        "7",
        "--output_path",
        str(out),
        "--log_samples",
    ]
    result = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=600)
    assert_ok(result)
    (results,) = out.glob("**/results_*.json")
    scores = {}
    for task in ("next_line", "hellaswag_local"):
        (samples,) = out.glob(f"**/samples_{task}_*.jsonl")
        records = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda r: r["doc_id"])
        scores[task] = [[float(score) for score, _ in record["filtered_resps"]] for record in records]
    return json.loads(results.read_text())["results"], scores


def test_callback_accuracy_equals_lm_evaluation_harness_on_the_exported_model(
    corpus, prepared: Path, trained: Path, tmp_path: Path
) -> None:
    checkpoint = trained / "checkpoints" / "last.ckpt"
    exported = export(str(checkpoint), str(tmp_path / "exported"))
    generic = prepared / TASK_PATH
    hellaswag = tmp_path / "hellaswag.jsonl"
    hellaswag.write_text("".join(json.dumps(record) + "\n" for record in HELLASWAG))
    (tmp_path / "tasks").mkdir()
    lm_eval_tasks(tmp_path / "tasks", generic, hellaswag)
    (tmp_path / "lm-eval").mkdir()
    theirs, their_scores = run_lm_eval(exported, tmp_path / "tasks", tmp_path / "lm-eval")

    config = tmp_path / "evals.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "callbacks": [
                        {
                            "class_path": "pretrain.evals.MultipleChoice",
                            "init_args": {
                                "tasks": {"next_line": str(generic), "hellaswag_local": str(hellaswag)},
                                "batch_size": 5,
                            },
                        }
                    ]
                }
            }
        )
    )
    args = tiny_fit_args(corpus[0], prepared, tmp_path / "logs", "--config", str(config))
    args[0] = "validate"
    result = run_main(*args, "--ckpt_path", str(checkpoint), cwd=tmp_path)
    assert_ok(result)
    run_dir = tmp_path / "logs" / "quickstart" / "version_0"

    loaded = load_checkpoint(checkpoint)
    model, tokenizer = load_model(loaded).eval(), load_tokenizer_from_checkpoint(loaded)
    for task, path in (("next_line", generic), ("hellaswag_local", hellaswag)):
        questions = read_task(path)
        for metric in ("acc", "acc_norm"):
            ours = next(iter(scalars_by_step(run_dir, f"eval/{task}/{metric}").values()))
            assert round(ours * len(questions)) == round(theirs[task][f"{metric},none"] * len(questions)), task
        # Each choice's score as well, not only the winners: the same tokens, the same log-likelihoods.
        rows = scoring_rows(
            questions, tokenizer, loaded["hyper_parameters"]["seq_len"], tokenizer.token_to_id("<|endoftext|>")
        )
        scores = torch.zeros(len(questions), max(len(q.continuations) for q in questions))
        with torch.no_grad():  # a question's choices share a row where they share their context
            batch = batch_of(rows)
            choice_scores(token_loglikelihoods(model, batch), batch.places, scores)
        for number, question in enumerate(questions):
            for choice in range(len(question.continuations)):
                their = their_scores[task][number][choice]
                assert scores[number, choice].item() == pytest.approx(their, rel=1e-4, abs=1e-3)


def test_two_processes_count_what_one_counts(corpus, prepared: Path, trained: Path, tmp_path: Path) -> None:
    accuracies = []
    for devices in ("1", "2"):
        args = tiny_fit_args(
            corpus[0],
            prepared,
            tmp_path / devices,
            "--trainer.devices",
            devices,
            "--trainer.strategy",
            "ddp" if devices == "2" else "auto",
        )
        args[0] = "validate"
        result = run_main(*args, "--ckpt_path", str(trained / "checkpoints" / "last.ckpt"), cwd=tmp_path)
        assert_ok(result)
        run_dir = tmp_path / devices / "quickstart" / "version_0"
        accuracies.append([scalars_by_step(run_dir, f"eval/next_line/{m}") for m in ("acc", "acc_norm")])
    assert accuracies[0] == accuracies[1]
