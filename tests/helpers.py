"""Callbacks that tests pass to ``main.py`` by class path (``--trainer.callbacks+ tests.helpers.X``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L


class RecordBatches(L.Callback):
    """Writes each rank's training batches (as token lists) to ``$RECORD_BATCHES_DIR/rank<N>.json``."""

    def __init__(self) -> None:
        self.batches: list[list[list[int]]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self.batches.append(batch.long().tolist())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = Path(os.environ["RECORD_BATCHES_DIR"]) / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.batches))
