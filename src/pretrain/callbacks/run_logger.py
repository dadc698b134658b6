"""TensorBoard, without Lightning's placeholders, and with runs that compare in the HPARAMS tab."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.tensorboard.summary import hparams

from pretrain._compat import event_file_writer


class RunLogger(TensorBoardLogger):
    """Lightning's ``TensorBoardLogger`` (same arguments) minus two cards that say nothing: ``epoch``, which
    Lightning adds to every write (a flat line when training is counted in steps), and ``hp_metric``, a
    constant -1. The run's settings and the metrics to compare runs by go to the HPARAMS tab instead
    (``pretrain.callbacks.run_review.RunReview`` writes them)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["default_hp_metric"] = False  # whatever a config passes: the HPARAMS row has real metrics
        super().__init__(*args, **kwargs)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics({name: value for name, value in metrics.items() if name != "epoch"}, step)


@rank_zero_only
def write_hparams(logger: TensorBoardLogger, settings: dict[str, Any], metric_tags: list[str]) -> None:
    """One HPARAMS row: ``settings`` as its columns, and ``metric_tags``, whose latest values in the run's
    scalars fill in as the run goes (nothing is written under those tags here)."""
    experiment, start, end = hparams(settings, dict.fromkeys(metric_tags, 0.0))
    writer = event_file_writer(logger.experiment)
    for summary in (experiment, start, end):
        writer.add_summary(summary)
    writer.flush()
