"""Counting the GPU-to-host reads of a run: the guard that training waits for the device only where it must."""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.helpers.runs import ROOT, TINY_MODEL, TINY_VOCAB

LOGGING_STEPS = {3, 7, 11}  # global_step + 1 a multiple of log_every_n_steps (4)
HOST_OPS = ("aten._local_scalar_dense", "aten.lift_fresh")  # .item()/float()/bool(); numbers into tensors


HOST_METHODS = ("tolist", "cpu", "numpy")  # reads that bypass the operators above


class HostReads(TorchDispatchMode):
    """Records, per training step, where the host reads a tensor or makes one from a number. On a GPU
    each waits for every queued kernel. Data loading is left out: batches are made on the host by
    design and reach the GPU asynchronously from pinned memory."""

    def __init__(self) -> None:
        super().__init__()
        self.step: int | str | None = None  # a training step, or a label such as "val0"
        self.by_step: dict[int | str, list[str]] = {}
        self._originals = {name: getattr(torch.Tensor, name) for name in HOST_METHODS}

    def record(self, what: str) -> None:
        if self.step is None:
            return
        frames = traceback.extract_stack()[:-2]
        if any("torch/utils/data/" in frame.filename for frame in frames):
            return
        ours = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames if "/torch/" not in f.filename]
        self.by_step.setdefault(self.step, []).append(f"{what} from {' < '.join(reversed(ours[-3:]))}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(HOST_OPS):
            self.record(str(func))
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> HostReads:
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, self._recording(name, original))
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)

    def _recording(self, name: str, original):
        def method(tensor: torch.Tensor, *args, **kwargs):
            self.record(f"Tensor.{name}")
            return original(tensor, *args, **kwargs)

        return method


class RecordHostReads(L.Callback):
    """Writes ``$RECORD_HOST_READS_DIR/rank<N>.json``: the host reads of each training step, those of
    each validation batch (keyed ``val<batch_idx>``, all validations together) and the steps after
    which validation ran. The end of a validation, which reads its result, is left unrecorded."""

    def __init__(self) -> None:
        self.reads = HostReads()
        self.validated_after: list[int] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.reads.__enter__()

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        self.reads.step = trainer.global_step

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.reads.step is not None:
            self.validated_after.append(self.reads.step)
        self.reads.step = None

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int, *args) -> None:
        self.reads.step = f"val{batch_idx}"

    def on_validation_batch_end(self, trainer: L.Trainer, *args) -> None:
        self.reads.step = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.reads.step = None
        self.reads.__exit__(None, None, None)
        path = Path(os.environ["RECORD_HOST_READS_DIR"]) / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"by_step": self.reads.by_step, "validated_after": self.validated_after}))


def gpu_config_on_cpu(corpus_root: Path, data_dir: Path, logs: Path, *extra: str) -> list[str]:
    """configs/gpt2-124m.yaml over gpu.yaml (fused AdamW, clipping, NaN guard, progress bar, throughput), tiny, on
    CPU; its 700 warmup steps fit themselves to the 12 steps."""
    configs = ROOT / "configs"
    return [
        "fit",
        "--config",
        str(configs / "gpu.yaml"),
        "--config",
        str(configs / "gpt2-124m.yaml"),
        "--trainer.accelerator",
        "cpu",
        "--trainer.precision",
        "32-true",
        "--model.compile",
        "false",
        "--model.preset",
        "tiny",
        "--model.overrides",
        TINY_MODEL,
        "--data.sources",
        f"[{corpus_root}]",
        "--data.data_dir",
        str(data_dir),
        "--data.val_fraction",
        "0.1",
        "--data.vocab_size",
        str(TINY_VOCAB),
        "--data.seq_len",
        "16",
        "--data.batch_size",
        "2",
        "--data.num_workers",
        "0",
        "--trainer.max_steps",
        "12",
        "--trainer.log_every_n_steps",
        "4",
        "--trainer.val_check_interval",
        "5",
        "--trainer.limit_val_batches",
        "2",
        "--trainer.logger.init_args.save_dir",
        str(logs),
        "--trainer.callbacks+",
        "tests.helpers.host_reads.RecordHostReads",
        *extra,
    ]


def check_host_reads(record_dir: Path, processes: int) -> None:
    """No host read between logging steps or in a validation batch, on every rank."""
    for rank in range(processes):
        recorded = json.loads((record_dir / f"rank{rank}.json").read_text())
        reads = {int(step): where for step, where in recorded["by_step"].items() if step.isdigit()}
        assert set(reads) >= LOGGING_STEPS  # the recorder sees the reads that do happen
        assert recorded["validated_after"] == [4, 9, 11]  # the interval (5), and the last step
        quiet = set(range(1, 12)) - LOGGING_STEPS - {4, 9}  # step 0 sets things up once
        assert {step: reads[step] for step in quiet if step in reads} == {}
        validation_reads = {key: where for key, where in recorded["by_step"].items() if key.startswith("val")}
        assert validation_reads == {}  # validation batches do not wait either: only its end reads the loss
