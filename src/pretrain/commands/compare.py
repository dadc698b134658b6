"""Checkpoints side by side: ``pretrain compare CKPT [CKPT ...]`` validates each and prints one table.

Each checkpoint is validated as its own run was configured (the ``config.yaml`` beside its
``checkpoints/`` folder), or with the ``--config`` files given; further ``--key value`` options apply to
every one (e.g. ``--trainer.limit_val_batches 50``). The table holds ``val/loss``, ``val/bpb`` and every
configured task's ``eval/NAME/acc`` and ``acc_norm``: two runs, or two steps of one, in one view.
"""

from __future__ import annotations

from pathlib import Path

from pretrain.checkpointing.loading import load_checkpoint
from pretrain.commands.benchmark import config_args
from pretrain.commands.cli import PretrainCLI
from pretrain.data import PretrainData
from pretrain.errors import CommandParser, UserError, run_command
from pretrain.train.module import PretrainModule

FIRST_COLUMNS = ("val/loss", "val/bpb")


def run_config(checkpoint: Path) -> Path:
    """The ``config.yaml`` a training run saved beside ``checkpoints/``, which holds ``checkpoint``."""
    config = checkpoint.resolve().parent.parent / "config.yaml"
    if not config.is_file():
        raise UserError(f"No config.yaml of the run beside {checkpoint.parent}; give the run's --config files.")
    return config


def validate(checkpoint: Path, configs: list[str], extra: list[str]) -> dict[str, float]:
    """What ``pretrain validate`` logs for ``checkpoint``, with nothing written to the run's folder."""
    if not checkpoint.exists():
        raise UserError(f"Checkpoint {checkpoint} does not exist; give .ckpt files or sharded checkpoint folders.")
    args = [
        "validate",
        *config_args(configs or [str(run_config(checkpoint))]),
        "--ckpt_path",
        str(checkpoint),
        "--trainer.logger",
        "false",
        "--verbose",
        "false",
        *extra,
    ]
    cli = PretrainCLI(
        PretrainModule, PretrainData, args=args, auto_configure_optimizers=False, save_config_callback=None
    )
    metrics = {name: float(value) for name, value in cli.trainer.callback_metrics.items()}
    return {"step": load_checkpoint(checkpoint).get("global_step"), **metrics}


def table(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table: a row per checkpoint; the held-out loss and bits per byte first, then every task."""
    seen = {name for metrics in results.values() for name in metrics}
    tasks = sorted(name for name in seen if name.startswith("eval/"))
    columns = ["step", *[name for name in FIRST_COLUMNS if name in seen], *tasks]
    lines = ["| checkpoint | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for checkpoint, metrics in results.items():
        cells = [_cell(metrics.get(name)) for name in columns]
        lines.append(f"| {checkpoint} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: float | int | None) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def main(argv: list[str] | None = None) -> None:
    parser = CommandParser(prog="pretrain compare", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+", help=".ckpt files or sharded checkpoint folders")
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        help="training configs for every checkpoint (default: each run's own config.yaml)",
    )
    options, extra = parser.parse_known_args(argv)
    results = {path: validate(Path(path), options.config, extra) for path in options.checkpoints}
    print(table(results))


if __name__ == "__main__":
    run_command(main)
