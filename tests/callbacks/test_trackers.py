"""A team on Weights & Biases or MLflow sets ``trainer.logger`` and gets what TensorBoard shows: the run's
settings, the val/, eval/, perf/ and tokens/ curves, the text samples. Offline: an offline W&B run, an MLflow
file store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.runs import assert_ok, tiny_fit_args

CURVES = {"val/loss", "val/bpb", "eval/next_line/acc", "perf/checkpoint_block_sec", "tokens/val_loss", "tokens/seen"}


def short_run(corpus, prepared: Path, tmp_path: Path, logger: dict) -> list[str]:
    """20 steps, validated (samples, the eval task) at the last; the tracker instead of TensorBoard."""
    return tiny_fit_args(
        corpus[0], prepared, tmp_path, "--trainer.max_steps", "20", "--trainer.logger", json.dumps(logger)
    )


def test_weights_and_biases_gets_settings_curves_and_samples(
    corpus, prepared: Path, tmp_path: Path, run_cli, monkeypatch
) -> None:
    wandb = pytest.importorskip("wandb")
    from tests.helpers.wandb_records import offline_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = {
        "class_path": "lightning.pytorch.loggers.WandbLogger",
        "init_args": {"project": "trackers", "save_dir": str(tmp_path), "offline": True},
    }
    result = run_cli(*short_run(corpus, prepared, tmp_path, logger))
    wandb.finish()
    assert_ok(result)
    keys, config = offline_run(tmp_path)
    assert keys >= CURVES | {"samples/prompts/_type", "samples/documents/_type"}
    assert config["run/parameters"] > 0 and config["run/optimizer"] == "MuonWithAdamW"
    (table,) = tmp_path.glob("wandb/offline-run-*/files/media/table/samples/prompts_*.table.json")
    prompts = json.loads(table.read_text())
    assert prompts["columns"][:2] == ["prompt", "greedy"]
    assert [row[0] for row in prompts["data"]] == ["def ", "import ", "class Queue"]  # the quickstart's prompts


def test_mlflow_gets_settings_curves_and_samples(corpus, prepared: Path, tmp_path: Path, run_cli, monkeypatch) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for a database unless told
    logger = {
        "class_path": "lightning.pytorch.loggers.MLFlowLogger",
        "init_args": {"experiment_name": "trackers", "tracking_uri": f"file:{tmp_path / 'mlruns'}", "save_dir": None},
    }
    assert_ok(run_cli(*short_run(corpus, prepared, tmp_path, logger)))
    (run,) = (path.parent for path in (tmp_path / "mlruns").glob("*/*/meta.yaml"))
    assert all((run / "metrics" / name).is_file() for name in CURVES)
    assert int((run / "params" / "run" / "parameters").read_text()) > 0
    samples = (run / "artifacts" / "samples" / "step_0000020.md").read_text()
    assert samples.startswith("| prompt | greedy |") and "a held-out document begins" in samples
