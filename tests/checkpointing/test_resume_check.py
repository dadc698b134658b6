"""A resume is judged before anything is written: another experiment under the same name is refused, and what
the user gives wins over what the checkpoint recorded, with each difference printed once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from pretrain.checkpointing.resume_check import read_checkpoint_record, run_changes, setting_changes
from tests.helpers.resume import TRAINED_STEPS
from tests.helpers.runs import assert_clean_failure, assert_ok, tiny_fit_args

OTHER_MODEL = "{d_model: 64, n_layer: 3, n_head: 2, n_kv_head: 2, ffn_dim: 128}"


def copied_run(trained: Path, logs: Path) -> Path:
    run = logs / "quickstart" / "version_0"
    shutil.copytree(trained, run, symlinks=True)
    return run


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_another_experiment_under_the_same_name_is_refused_before_anything_is_written(
    corpus, prepared: Path, trained: Path, tmp_path: Path, run_cli
) -> None:
    run = copied_run(trained, tmp_path)
    before = snapshot(tmp_path)
    args = tiny_fit_args(corpus[0], prepared, tmp_path, "--ckpt_path", "last", "--model.overrides", OTHER_MODEL)
    result = run_cli(*args)
    assert_clean_failure(result, f"{run} is another experiment's run (model n_layer 2 -> 3)", "own --trainer.logger")
    assert "Traceback" not in result.stderr
    assert snapshot(tmp_path) == before  # its config.yaml kept, no new version folder


def test_an_explicit_checkpoint_of_another_model_names_the_config_it_was_saved_with(
    corpus, prepared: Path, trained: Path, tmp_path: Path, run_cli
) -> None:
    run = copied_run(trained, tmp_path)
    checkpoint = run / "checkpoints" / "last.ckpt"
    result = run_cli(
        *tiny_fit_args(corpus[0], prepared, tmp_path, "--ckpt_path", str(checkpoint), "--model.overrides", OTHER_MODEL)
    )
    assert_clean_failure(result, "holds another model (model n_layer 2 -> 3)", f"--config {run / 'config.yaml'}")


def test_settings_given_with_an_explicit_checkpoint_apply_and_are_printed(
    corpus, prepared: Path, trained: Path, tmp_path: Path, run_cli
) -> None:
    checkpoint = copied_run(trained, tmp_path) / "checkpoints" / "last.ckpt"
    steps = str(TRAINED_STEPS + 10)
    args = tiny_fit_args(corpus[0], prepared, tmp_path, "--trainer.max_steps", steps, "--ckpt_path", str(checkpoint))
    result = run_cli(*args, "--model.z_loss", "0.001", "--model.spike_sigmas", "5.0")
    assert_ok(result)
    assert result.stderr.count("Resuming with settings that differ") == 1
    assert "model.z_loss: 0.0 -> 0.001" in result.stderr and "model.spike_sigmas: 6.0 -> 5.0" in result.stderr
    saved = torch.load(
        next((tmp_path / "quickstart" / "version_1" / "checkpoints").glob("step=*.ckpt")), weights_only=True
    )
    assert saved["global_step"] == TRAINED_STEPS + 10
    assert (saved["hyper_parameters"]["z_loss"], saved["hyper_parameters"]["spike_sigmas"]) == (0.001, 5.0)


def test_a_rebuilt_data_folder_is_another_run(trained: Path, prepared: Path, tmp_path: Path) -> None:
    record = read_checkpoint_record(trained / "checkpoints" / "last.ckpt")
    model = dict(record["hyper_parameters"])
    seq_len = record["hyper_parameters"]["seq_len"]
    assert run_changes(record, model, {"data_dir": str(prepared), "seq_len": seq_len}) == []
    rebuilt = tmp_path / "data"
    shutil.copytree(prepared, rebuilt)
    manifest = json.loads((rebuilt / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = "f" * 64
    (rebuilt / "manifest.json").write_text(json.dumps(manifest))
    changes = run_changes(record, model, {"data_dir": str(rebuilt), "seq_len": seq_len * 2})
    assert changes[0] == f"data.seq_len {seq_len} -> {seq_len * 2}"
    assert changes[1].startswith("tokenizer ") and "-> ffffffffffffffff" in changes[1]


def test_setting_changes_compare_nested_settings_both_sides_hold() -> None:
    saved = {"model": {"z_loss": 0.0, "optimizer": {"init_args": {"lr": 0.02}}}, "ckpt_path": None, "old": 1}
    now = {"model": {"z_loss": 0.0, "optimizer": {"init_args": {"lr": 0.01}}}, "ckpt_path": "x.ckpt", "new": 2}
    assert setting_changes(saved, now) == ["model.optimizer.init_args.lr: 0.02 -> 0.01"]
