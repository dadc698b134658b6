"""How long each checkpoint save holds up training, written in place and in the background, side by side.

    python scripts/checkpoint_stalls.py                       # 1 CPU process, single-file checkpoints
    python scripts/checkpoint_stalls.py --fsdp2 --devices 2   # 2 processes, sharded folders
    python scripts/checkpoint_stalls.py --model "{}" -- --config configs/gpu.yaml --config configs/gpt2-124m.yaml

Each variant is one short ``pretrain fit`` of the quickstart config and the configs after ``--`` (the last line:
on a GPU, the preset's own shape), on the embedded corpus, saving every ``--every`` steps; the stalls are the
runs' ``perf/checkpoint_block_sec``.
Run on a quiet machine: a second job changes the write times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]


def stalls(logs: Path) -> list[float]:
    events = EventAccumulator(str(logs / "stalls" / "version_0"))
    events.Reload()
    return [event.value for event in events.Scalars("perf/checkpoint_block_sec")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10, help="steps between saves")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--fsdp2", action="store_true", help="sharded checkpoints (pretrain.train.FSDP2Strategy)")
    parser.add_argument(
        "--model", default="{d_model: 512, n_layer: 8, n_head: 8, n_kv_head: 8, ffn_dim: 2048}", help="overrides"
    )
    parser.add_argument("fit_args", nargs="*", help="more `pretrain fit` options, after --")
    options = parser.parse_args()
    strategy = ["--trainer.strategy", '{"class_path": "pretrain.train.FSDP2Strategy"}'] if options.fsdp2 else []
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for mode in ("false", "true"):
            logs = Path(scratch) / f"async-{mode}"
            command = [
                sys.executable, str(ROOT / "main.py"), "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
                *options.fit_args, "--data.data_dir", str(Path(scratch) / "data"), "--model.overrides", options.model,
                "--trainer.max_steps", str(options.steps), "--trainer.val_check_interval", str(options.steps),
                "--trainer.limit_val_batches", "1", "--trainer.devices", str(options.devices),
                "--trainer.logger.init_args.save_dir", str(logs), "--trainer.logger.init_args.name", "stalls",
                "--trainer.enable_progress_bar", "false", "--checkpoint.every_n_train_steps", str(options.every),
                "--checkpoint.async_save", mode, *strategy,
            ]  # fmt: skip
            done = subprocess.run(command, cwd=scratch, capture_output=True, text=True, env={**os.environ})
            if done.returncode:
                sys.exit(f"async_save {mode} failed:\n{done.stderr[-3000:]}")
            saved = (logs / "stalls" / "version_0" / "checkpoints").rglob("*")
            size = sum(path.stat().st_size for path in saved if path.is_file() and not path.is_symlink())
            rows.append((mode, stalls(logs), size))
    print(f"\n{'async_save':<11} {'saves':>5} {'median s':>9} {'max s':>7} {'checkpoint MB':>14}")
    for mode, values, size in rows:
        print(f"{mode:<11} {len(values):>5} {statistics.median(values):>9.3f} {max(values):>7.3f} {size / 1e6:>14.1f}")


if __name__ == "__main__":
    main()
