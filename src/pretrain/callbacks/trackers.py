"""What a run shows besides its scalars, in each tracker it logs to: TensorBoard (the default), Weights & Biases,
MLflow. Scalars reach every Lightning logger alike; text and the run's settings have a type of their own in
each tracker."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

Table = tuple[tuple[str, ...], list[tuple[str, ...]]]  # header, rows


def write_tables(logger: Logger, key: str, tables: dict[str, Table], markdown: str, step: int) -> None:
    """Named tables of text at ``step``: ``markdown`` (the same tables) in TensorBoard's TEXT tab, a table per
    name in W&B (``KEY/NAME``), ``markdown`` as a file per step among an MLflow run's artifacts
    (``KEY/step_NNNNNNN.md``)."""
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_text(key, markdown, step)
    elif isinstance(logger, WandbLogger):
        for name, (header, rows) in tables.items():
            logger.log_table(key=f"{key}/{name}", columns=list(header), data=[list(row) for row in rows], step=step)
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_text(logger.run_id, markdown, f"{key}/step_{step:07d}.md")


def write_settings(logger: Logger, settings: dict[str, Any]) -> None:
    """The run's settings (``run/NAME``) where a tracker has no HPARAMS table of TensorBoard's kind: its
    config (W&B), its params (MLflow)."""
    if not isinstance(logger, TensorBoardLogger):
        logger.log_hyperparams({f"run/{name}": value for name, value in settings.items()})
