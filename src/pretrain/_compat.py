"""Every private Lightning, litdata and torch name the project relies on, in one place.

Private names change without notice between releases. The project reaches each one only through
this module, and ``PRIVATE_NAMES`` lists them all with the reason, so that ``tests/test_compat.py``
names the one an upgrade removed and where it is used: the fix starts here. ``CHECKED_ON`` records
the versions on which every name was last read against the libraries' source. Names are looked up
when used, so importing this module never fails on a newer release.
"""

from __future__ import annotations

import importlib
import pickle
from typing import Any

CHECKED_ON = {"lightning": "2.6.6", "litdata": "0.2.76", "torch": "2.14.1"}

# "module:attribute.path" -> where the project uses it. Methods of Lightning classes the project overrides
# are listed too: a renamed one would silently stop being called.
PRIVATE_NAMES: dict[str, str] = {
    "lightning.pytorch.loops.fit_loop:_FitLoop._should_accumulate": "ends_optimizer_step",
    "lightning.pytorch.trainer.connectors.signal_connector:_SignalConnector": "take_over_lightning_sigterm",
    "lightning.pytorch.loops.training_epoch_loop:_TrainingEpochLoop": "take_over_lightning_sigterm",
    "lightning.pytorch.callbacks:ModelCheckpoint._save_checkpoint": "PretrainCheckpoint (overrides)",
    "lightning.pytorch.callbacks:ModelCheckpoint._link_checkpoint": "PretrainCheckpoint (overrides)",
    "lightning.pytorch.callbacks:ModelCheckpoint._remove_checkpoint": "PretrainCheckpoint (overrides)",
    "lightning.pytorch.callbacks:ModelCheckpoint._save_topk_checkpoint": "save_checkpoint_now",
    "lightning.pytorch.callbacks:ModelCheckpoint._save_last_checkpoint": "save_checkpoint_now",
    "lightning.pytorch.callbacks:ModelCheckpoint._monitor_candidates": "save_checkpoint_now",
    "lightning.pytorch.cli:LightningCLI._parse_ckpt_path": "PretrainCLI (overrides)",
    "lightning.pytorch.cli:LightningCLI._get": "cli_config_value",
    "lightning.pytorch.cli:LightningCLI._parser": "cli_config_dump",
    "lightning.pytorch.callbacks:Callback._generate_state_key": "callback_state_key",
    "lightning.pytorch.strategies:ModelParallelStrategy": "set_data_parallel_size",
    "litdata.utilities.env:_DistributedEnv": "write_as_single_process",
    "litdata.constants:_NUMPY_DTYPES_MAPPING": "numpy_dtype_of_code",
    "torch.distributed.checkpoint.state_dict_loader:_load_state_dict": "load_into_empty",
    "torch.distributed.checkpoint.default_planner:_EmptyStateDictLoadPlanner": "load_into_empty",
    "torch.distributed.checkpoint.filesystem:_StorageInfo": "storage_info_class",
    "pickle:_Unpickler": "PurePythonUnpickler (Python's own; stable)",
    "torch.utils.tensorboard.writer:SummaryWriter._get_file_writer": "event_file_writer (as Lightning uses it)",
    "torch._inductor.cpp_builder:get_cpp_compiler": "has_cpp_compiler (model.compile: auto)",
    "torch.cpu:_is_amx_tile_supported": "cpu_has_amx (Muon's Newton-Schulz precision)",
}
# Private attributes set or read on instances, checked by tests/test_compat.py on a real trainer.
PRIVATE_ATTRIBUTES = {
    "Trainer._signal_connector": "take_over_lightning_sigterm",
    "_SignalConnector.received_sigterm": "take_over_lightning_sigterm",
    "_TrainingEpochLoop._broadcast_sigterm_tensor": "take_over_lightning_sigterm (Lightning 2.6 only)",
    "ModelParallelStrategy._data_parallel_size": "set_data_parallel_size",
    "BinaryWriter._distributed_env": "write_as_single_process",
    "ModelCheckpoint._last_global_step_saved": "save_checkpoint_now",
    "ModelCheckpoint._last_checkpoint_saved": "last_checkpoint_saved",
    "LightningModule._trainer": "attached_trainer",
    "LRScheduler._step_count": "scheduler_step_count, set_scheduler_position",
    "LRScheduler._last_lr": "set_scheduler_position",
}

PurePythonUnpickler = pickle._Unpickler  # Python's pure-Python unpickler: its steps can be overridden one by one


def private(dotted: str) -> Any:
    """The object at ``module:attribute.path`` (one of ``PRIVATE_NAMES``)."""
    module_name, _, path = dotted.partition(":")
    found: Any = importlib.import_module(module_name)
    for part in path.split("."):
        found = getattr(found, part)
    return found


def ends_optimizer_step(trainer: Any) -> bool:
    """Whether the batch just trained ended an optimizer step: with gradient accumulation only the last
    micro-batch of each does, so work meant once per step (reads, logs, saves) goes there."""
    return not trainer.fit_loop._should_accumulate()


def take_over_lightning_sigterm(trainer: Any) -> bool:
    """Whether Lightning's handler has caught a SIGTERM; clears its flag and turns off Lightning's per-step
    broadcast of that flag between ranks (a wait for the GPU each step): the caller handles stop signals."""
    received = bool(trainer.received_sigterm)
    trainer._signal_connector.received_sigterm = False
    epoch_loop = trainer.fit_loop.epoch_loop
    if hasattr(epoch_loop, "_broadcast_sigterm_tensor"):  # Lightning 2.6 broadcasts it at every step
        epoch_loop._broadcast_sigterm_tensor = _no_broadcast
    return received


def _no_broadcast() -> None:
    """Stands in for Lightning's per-step SIGTERM broadcast (see ``take_over_lightning_sigterm``)."""


def set_data_parallel_size(strategy: Any, size: int) -> None:
    """ModelParallelStrategy takes its data-parallel size only as a constructor argument, before the
    number of devices and nodes is known."""
    strategy._data_parallel_size = size


def write_as_single_process(writer: Any) -> None:
    """litdata's writer names and counts chunks by the process's rank; here one process writes them all."""
    writer._distributed_env = private("litdata.utilities.env:_DistributedEnv")(world_size=1, global_rank=0, num_nodes=1)


def numpy_dtype_of_code(code: int) -> Any:
    """The numpy dtype behind a litdata chunk header's dtype code."""
    return private("litdata.constants:_NUMPY_DTYPES_MAPPING")[code]


def event_file_writer(summary_writer: Any) -> Any:
    """The writer of a ``SummaryWriter``'s own event file: an HPARAMS entry goes into the run's folder, where its
    metrics are, rather than into the subfolder ``SummaryWriter.add_hparams`` would make."""
    return summary_writer._get_file_writer()


def storage_info_class() -> type:
    """The class torch's sharded-checkpoint index uses to locate each entry's bytes."""
    return private("torch.distributed.checkpoint.filesystem:_StorageInfo")


def load_into_empty(entries: dict[str, Any], reader: Any, keys: set[str]) -> None:
    """Fill ``entries`` with the saved entries under ``keys``, as Lightning reads a sharded folder without a
    model to load into (the public ``dcp.load`` needs the state dict's shape in advance)."""
    planner = private("torch.distributed.checkpoint.default_planner:_EmptyStateDictLoadPlanner")(keys=keys)
    private("torch.distributed.checkpoint.state_dict_loader:_load_state_dict")(
        entries, storage_reader=reader, planner=planner, no_dist=True
    )


def has_cpp_compiler() -> bool:
    """Whether inductor finds the C++ compiler it builds CPU kernels with."""
    try:
        private("torch._inductor.cpp_builder:get_cpp_compiler")()
    except Exception:  # inductor raises its own InvalidCxxCompiler, or fails to import where it cannot run
        return False
    return True


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (bf16 matmuls at several times fp32's speed); False where torch cannot tell."""
    try:
        return bool(private("torch.cpu:_is_amx_tile_supported")())
    except (ImportError, AttributeError):
        return False


def scheduler_step_count(scheduler: Any) -> int:
    """How many times a learning-rate scheduler has stepped (torch warns on a step before the optimizer's)."""
    return scheduler._step_count


def set_scheduler_position(scheduler: Any, step_count: int, learning_rates: list[float]) -> None:
    """Set a scheduler's step count and the learning rates ``get_last_lr`` reports, as its own step would."""
    scheduler._step_count = step_count
    scheduler._last_lr = learning_rates


def save_checkpoint_now(callback: Any, trainer: Any) -> None:
    """Save the current step through a ``ModelCheckpoint`` (unless already saved) and point ``last`` at it,
    as its own end-of-step save would, outside its schedule (a preemption signal)."""
    if callback._last_global_step_saved == trainer.global_step:
        return
    candidates = callback._monitor_candidates(trainer)
    callback._save_topk_checkpoint(trainer, candidates)
    if callback._last_global_step_saved != trainer.global_step:  # save_top_k: 0 keeps no step files
        callback._save_checkpoint(trainer, callback.format_checkpoint_name(candidates))
    callback._save_last_checkpoint(trainer, candidates)


def last_checkpoint_saved(callback: Any) -> str:
    """The path a ``ModelCheckpoint`` saved last."""
    return callback._last_checkpoint_saved


def attached_trainer(module: Any) -> Any:
    """The trainer a LightningModule is attached to, or None (its ``trainer`` property raises instead)."""
    return module._trainer


def callback_state_key(callback: Any, **identity: Any) -> str:
    """A callback's key in a checkpoint, told apart from others of its class by ``identity``."""
    return callback._generate_state_key(**identity)


def cli_config_value(cli: Any, config: Any, key: str, default: Any = None) -> Any:
    """A value of a LightningCLI's config for the subcommand being run."""
    return cli._get(config, key, default=default)


def cli_config_dump(cli: Any, config: Any) -> str:
    """A subcommand's config as YAML, as LightningCLI writes it to the run's ``config.yaml``."""
    return cli._parser(cli.subcommand).dump(config, skip_none=False)
