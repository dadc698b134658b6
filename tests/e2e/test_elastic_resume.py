"""A run saved on N processes resumes on M: every step trains the blocks an uninterrupted run on one process
trains, none twice and none skipped, as the training stream is one global sequence (``block_order``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.runs import assert_ok, run_main, tiny_fit_args

STEPS, GLOBAL_BATCH = 12, 8


def fit(
    corpus_root: Path, data_dir: Path, logs: Path, record: Path, processes: int, max_steps: int, *extra: str
) -> list[list[tuple[int, ...]]]:
    """Run ``fit`` on ``processes`` CPU processes; the blocks of each step, all ranks together."""
    layout = (
        "--trainer.devices",
        str(processes),
        "--data.batch_size",
        str(GLOBAL_BATCH // processes),
        *(("--trainer.strategy", "ddp") if processes > 1 else ()),
    )
    args = tiny_fit_args(
        corpus_root,
        data_dir,
        logs,
        *layout,
        "--trainer.max_steps",
        str(max_steps),
        "--checkpoint.every_n_train_steps",
        str(STEPS // 2),
        "--data.num_workers",
        "1",
        "--trainer.callbacks+",
        "tests.helpers.runs.RecordBatches",
        *extra,
    )
    record.mkdir(parents=True)
    result = run_main(*args, cwd=logs.parent, env={"RECORD_BATCHES_DIR": str(record)})
    assert_ok(result)
    ranks = [json.loads((record / f"rank{rank}.json").read_text()) for rank in range(processes)]
    return [sorted(tuple(block) for rank in ranks for block in rank[step]) for step in range(len(ranks[0]))]


@pytest.mark.parametrize(("before", "after", "data"), [(2, 1, "corpus"), (1, 2, "corpus"), (2, 1, "mixture")])
def test_a_run_resumed_on_another_number_of_processes_trains_every_block_once(
    request: pytest.FixtureRequest, tmp_path: Path, before: int, after: int, data: str
) -> None:
    if data == "corpus":
        corpus_root, data_dir, extra = request.getfixturevalue("corpus")[0], request.getfixturevalue("prepared"), ()
    else:  # letters and digits weighted 3 : 1, the digits passing many times
        corpus_root, data_dir = Path("unused"), request.getfixturevalue("built")
        extra = ("--data.sources", "null", "--data.mixture", json.dumps(request.getfixturevalue("mixture")))
    reference = fit(
        corpus_root, data_dir, tmp_path / "straight" / "logs", tmp_path / "straight" / "record", 1, STEPS, *extra
    )
    logs = tmp_path / "resumed" / "logs"
    first = fit(corpus_root, data_dir, logs, tmp_path / "resumed" / "first", before, STEPS // 2, *extra)
    second = fit(
        corpus_root, data_dir, logs, tmp_path / "resumed" / "second", after, STEPS, *extra, "--ckpt_path", "last"
    )
    assert len(first) == len(second) == STEPS // 2
    assert first + second == reference
    if data == "corpus":
        blocks = [block for step in reference for block in step]
        assert len(set(blocks)) == len(blocks) == STEPS * GLOBAL_BATCH  # within one pass: no block twice
