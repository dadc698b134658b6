"""The command line: ``pretrain fit|validate|test|prepare|generate|export|benchmark|compare``
(also ``python main.py ...``).

``fit``, ``validate`` and ``test`` are LightningCLI's, wired for pretraining; the others are this project's
tools, each also runnable as ``python -m pretrain.<tool>``. Every command reports a user mistake in one
line, ``error: ...``, with status 2 (``pretrain.errors.run_command``).
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from pretrain._compat import cli_config_dump, cli_config_value
from pretrain.callbacks.progress_bar import LossProgressBar
from pretrain.callbacks.run_review import RunReview
from pretrain.checkpointing.callback import PretrainCheckpoint
from pretrain.checkpointing.last import checkpoint_problem, find_last_checkpoint
from pretrain.checkpointing.resume_check import read_checkpoint_record, run_changes, saved_config_path, setting_changes
from pretrain.checkpointing.sharded import check_sharded_folder
from pretrain.data import PretrainData
from pretrain.errors import Interrupted, LoaderWorkerDied, UserError, run_command
from pretrain.train.module import PretrainModule

log = logging.getLogger(__name__)
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc")  # --ckpt_path names Lightning resolves itself
# PyTorch's words for a loader worker process that is gone (not for an error raised inside one).
WORKER_DIED = re.compile(r"DataLoader worker \(pid(\(s\))? [\d, ]+\) (is killed by signal|exited unexpectedly)")


class PretrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Always checkpoint, configurable as e.g. --checkpoint.every_n_train_steps 50.
        parser.add_lightning_class_args(PretrainCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.filename": "{step:07d}",
                "checkpoint.every_n_train_steps": 500,
                "checkpoint.save_top_k": -1,
                "checkpoint.save_last": "link",
            }
        )
        # The model's vocabulary and context come from the data: nobody types them twice.
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.seq_len", "model.seq_len", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """As Lightning's, without its warning about ``args`` given beside ``sys.argv``: the ``pretrain``
        command always passes them, the subcommand's name removed for the tools."""
        is_object = isinstance(args, (dict, Namespace))
        self.config = parser.parse_object(args) if is_object else parser.parse_args(args)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, with a progress bar that does not wait for the GPU each step (unless the config turns
        the bar off or configures its own), and ``RunReview`` (HPARAMS, curves by tokens) in every run.

        ``trainer.deterministic`` also fills every new tensor before an op writes it; none of our ops reads
        memory it never wrote, and the fills cost time, so they are turned off (docs/design.md#small-choices-measured).
        """
        trainer_config = cli_config_value(self, self.config_init, "trainer", default={})
        callbacks = trainer_config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        added = [] if any(isinstance(callback, RunReview) for callback in callbacks) else [RunReview()]
        has_bar = any(isinstance(callback, ProgressBar) for callback in callbacks)
        if trainer_config.get("enable_progress_bar") is not False and not has_bar:
            added.append(LossProgressBar())
        if added:
            kwargs["callbacks"] = [*callbacks, *added]
        trainer = super().instantiate_trainer(**kwargs)
        torch.utils.deterministic.fill_uninitialized_memory = False  # after the trainer set the deterministic mode
        return trainer

    def fit(self, model: PretrainModule, ckpt_path: str | None = None, **kwargs: Any) -> None:
        self._run(self.trainer.fit, model, ckpt_path, **kwargs)
        model.step_guard.raise_if_stopped(self.trainer)  # a diverged run ends with its message and status 1, once saved
        checkpoint = self.trainer.checkpoint_callback
        if isinstance(checkpoint, PretrainCheckpoint) and checkpoint.stopped_by == signal.SIGINT:
            raise Interrupted(f"saved step {self.trainer.global_step}; continue with --ckpt_path last")

    def validate(self, model: PretrainModule, ckpt_path: str | None = None, **kwargs: Any) -> None:
        self._run(self.trainer.validate, model, ckpt_path, **kwargs)

    def test(self, model: PretrainModule, ckpt_path: str | None = None, **kwargs: Any) -> None:
        self._run(self.trainer.test, model, ckpt_path, **kwargs)

    @staticmethod
    def _run(method: Callable[..., Any], model: PretrainModule, ckpt_path: str | None, **kwargs: Any) -> None:
        """A trainer method, with the checkpoint named in plain words when it cannot be used."""
        if (
            ckpt_path
            and ckpt_path not in LIGHTNING_CKPT_NAMES
            and "://" not in ckpt_path
            and not Path(ckpt_path).exists()
        ):
            raise UserError(
                f"Checkpoint {ckpt_path} does not exist; give a .ckpt file, or 'last' to continue the newest run."
            )
        if ckpt_path and kwargs.get("weights_only") is not False and Path(ckpt_path).is_dir():
            check_sharded_folder(Path(ckpt_path))  # Lightning's sharded loading unpickles it unchecked
        # A checkpoint's weights replace init_from's, which are then not read (where Lightning resolves a name such
        # as "last" itself, it may find none: they are read, and replaced if it does).
        model.restoring = bool(ckpt_path) and ckpt_path not in LIGHTNING_CKPT_NAMES
        try:
            method(model, ckpt_path=ckpt_path, **kwargs)
        except pickle.UnpicklingError:
            raise _unsafe_checkpoint(ckpt_path) from None
        except RuntimeError as error:  # PyTorch's report of a loader worker that died (killed, out of memory)
            if not WORKER_DIED.match(str(error)):
                raise
            raise LoaderWorkerDied(
                f"{str(error).strip()} The run stopped without saving this step; find why the worker died (the "
                "kernel log for memory, a smaller data.num_workers), then continue with --ckpt_path last."
            ) from None

    def _parse_ckpt_path(self) -> None:
        """``validate``/``test``: Lightning's, the checkpoint's module arguments laid over the configs (the model
        read is the one saved). ``fit``: nothing, since that dropped e.g. ``--model.z_loss`` given with an explicit
        ``--ckpt_path``: what the user gives applies, as with ``--ckpt_path last``, and ``_check_resume`` prints
        what differs from the run's saved settings."""
        if self.config.get("subcommand") == "fit":
            return
        try:
            super()._parse_ckpt_path()
        except pickle.UnpicklingError:
            raise _unsafe_checkpoint(self.config[self.config.subcommand].get("ckpt_path")) from None

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        _refuse_fp16_mixed(config)
        _fill_schedule_length(config)
        if "weights_only" in config and config.weights_only is None:
            config.weights_only = True  # checkpoints hold tensors and plain values: refuse any that runs code
        chosen_by_last = config.get("ckpt_path") == "last"
        if chosen_by_last:
            _use_last_checkpoint(config, continue_run=self.subcommand == "fit")
        if config.get("ckpt_path") and self.subcommand == "fit":
            self._check_resume(config, chosen_by_last)

    def _check_resume(self, config: Namespace, chosen_by_last: bool) -> None:
        """Refuse a checkpoint of another experiment before anything is written; print the settings that differ
        from the run's saved ``config.yaml`` once."""
        path = Path(config.ckpt_path)
        if "://" in config.ckpt_path or not path.exists():
            return  # an object store's, read by Lightning; a missing one is named in _run
        start = config.model.get("init_from")
        if start and not start.endswith(".ckpt") and not Path(start).exists():  # a checkpoint's weights are not needed
            raise UserError(
                f"model.init_from {start} is gone: a run started from a Hugging Face folder reads its config.json "
                "(the architecture) when it resumes too. Put the folder back where the run's config says."
            )
        if not chosen_by_last and (problem := checkpoint_problem(path)):
            raise UserError(
                f"Checkpoint {path} cannot be resumed: {problem}. --ckpt_path last picks the newest whole one."
            )
        try:
            record = read_checkpoint_record(path, weights_only=config.get("weights_only") is not False)
        except pickle.UnpicklingError:
            raise _unsafe_checkpoint(str(path)) from None
        changes = run_changes(record, config.model.as_dict(), config.data.as_dict())
        if config.data.get("allow_new_build"):  # other data on purpose: the data loader says what starts over
            changes = [change for change in changes if change.startswith("model ")]
        saved_config = saved_config_path(path)
        if changes and chosen_by_last:
            raise UserError(
                f"{path.parent.parent} is another experiment's run ({'; '.join(changes)}). Give this experiment its "
                "own --trainer.logger.init_args.name to start a new run; to go on from that checkpoint on purpose, "
                f"give it as --ckpt_path {path}."
            )
        if model_changes := [change for change in changes if change.startswith("model ")]:
            where = f" (--config {saved_config})" if saved_config else ""
            raise UserError(
                f"Checkpoint {path} holds another model ({'; '.join(model_changes)}); resume it with the model "
                f"settings it was saved with{where}."
            )
        saved = yaml.safe_load(saved_config.read_text()) if saved_config else {"model": record.get("hyper_parameters")}
        now = yaml.safe_load(cli_config_dump(self, config))
        if (differences := setting_changes(saved or {}, now)) and rank_zero_only.rank == 0:
            log.info("Resuming with settings that differ from the run's: %s", "; ".join(differences))


def _unsafe_checkpoint(path: str | None) -> UserError:
    return UserError(
        f"{path} holds objects other than tensors and plain values, so it was not loaded: unpickling it "
        "could run code. If you trust where it came from, add --weights_only false."
    )


def _refuse_fp16_mixed(config: Namespace) -> None:
    """fp16 autocast needs a gradient scaler, and the scaled gradients would be what the clipping, the logged
    ``train/grad_norm`` and the step guard measure (the guard would also stop the run on the scaler's
    normal overflow steps)."""
    if str(config.trainer.get("precision")) in ("16-mixed", "16"):
        raise UserError(
            "trainer.precision: 16-mixed is not supported: its gradient scaling would have the clipping and the "
            "step guard measure scaled gradients. Use bf16-mixed (A100, H100 and newer; also CPUs) or 32-true."
        )


def _fill_schedule_length(config: Namespace) -> None:
    """A schedule with ``max_steps`` unset ends where training ends: ``trainer.max_steps``."""
    init_args = getattr(config.model.lr_scheduler, "init_args", None)
    if init_args is not None and "max_steps" in init_args and init_args.max_steps is None:
        init_args.max_steps = config.trainer.max_steps


def _use_last_checkpoint(config: Namespace, continue_run: bool) -> None:
    """``--ckpt_path last``: the newest checkpoint of this experiment's newest run.

    ``fit`` continues that run in its own log folder; ``validate``/``test`` just read it.
    """
    init_args = getattr(config.trainer.logger, "init_args", None)
    if init_args is None or "save_dir" not in init_args or "version" not in init_args:
        return  # no versioned logger to search: leave "last" to Lightning
    name = init_args.get("name") or "lightning_logs"
    found = find_last_checkpoint(init_args.save_dir, name)
    if found is not None and found[1] is None:  # saves exist, none whole: starting over would drop the run's steps
        raise UserError(
            f"No checkpoint of {name} in {init_args.save_dir}/{name}/version_{found[0]} is whole (see the warnings "
            "above), so it cannot be resumed. Give --ckpt_path a checkpoint you trust, or leave --ckpt_path out to "
            "start a new run."
        )
    if found is None:
        if not continue_run:
            raise UserError(f"No checkpoint of {name} under {init_args.save_dir} yet; give --ckpt_path a .ckpt file.")
        log.info("No checkpoint of %s under %s yet: starting a new run", name, init_args.save_dir)
        config.ckpt_path = None
        return
    version, path = found
    config.ckpt_path = str(path)
    if continue_run:
        log.info("Resuming %s/%s/version_%d from %s", init_args.save_dir, name, version, path.resolve())
        init_args.version = version  # TensorBoard continues the same run folder


class DataOnlyCLI(PretrainCLI):
    """``pretrain prepare``: training configs parsed and composed exactly as ``fit`` does (several ``--config``,
    ``--data.*`` overrides), but only the data module is built from them."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        # A run's saved config.yaml also holds fit's own options: accepted here, and ignored.
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="ignored by prepare")
        parser.add_argument("--weights_only", type=bool | None, default=None, help="ignored by prepare")
        parser.add_argument(
            "--verify",
            action="store_true",
            help="check the finished build in data.data_dir (every chunk against its checksum, every "
            "token id against the vocabulary) instead of building",
        )

    def before_instantiate_classes(self) -> None:
        pass  # nothing to resume, no schedule to fill

    def instantiate_classes(self) -> None:
        self.datamodule = PretrainData(**self.config.data.as_dict())


def data_cli(argv: list[str] | None) -> DataOnlyCLI:
    """``pretrain prepare``'s command line: its data module is ``cli.datamodule``, ``--verify`` is ``cli.config``'s."""
    return DataOnlyCLI(
        PretrainModule,
        PretrainData,
        args=argv,
        run=False,
        auto_configure_optimizers=False,
        parser_kwargs={"prog": "pretrain prepare"},
    )


def data_module_from_args(argv: list[str] | None) -> PretrainData:
    """The data module that ``fit`` with the same ``--config`` files and ``--data.*`` options would build."""
    return data_cli(argv).datamodule


def warn_if_restarts_share_the_store() -> None:
    """Under ``torchrun --max-restarts``, a store shared between torchrun and the training processes can hand a
    restarted group the previous attempt's addresses, and the group then fails to form (pytorch/pytorch#135712)."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and os.environ.get("RANK") == "0":
        log.warning(
            "torchrun --max-restarts %d shares its store with the training processes: after a lost rank the "
            "restarted group can fail to form (pytorch/pytorch#135712). Start torchrun with "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (docs/checkpointing.md, a lost rank).",
            restarts,
        )


def train(argv: list[str] | None = None) -> None:
    """``fit``, ``validate`` or ``test``: LightningCLI with this project's module and data."""
    warn_if_restarts_share_the_store()
    PretrainCLI(
        PretrainModule,
        PretrainData,
        args=argv,
        auto_configure_optimizers=False,
        trainer_defaults={"max_epochs": -1},
        save_config_kwargs={"overwrite": True},  # a resumed run rewrites its own config.yaml
    )


TOOLS = {  # subcommand -> (module with a main(argv), what it does)
    "prepare": ("pretrain.commands.prepare", "raw text -> tokenizer + token shards, alone (e.g. on CPU nodes)"),
    "generate": ("pretrain.commands.generate", "continue a prompt with a trained checkpoint"),
    "export": ("pretrain.commands.export", "write a checkpoint as a Hugging Face Llama folder"),
    "benchmark": ("pretrain.commands.benchmark", "time the training step against a bare loop, or the data path"),
    "compare": ("pretrain.commands.compare", "validate checkpoints and print their held-out figures side by side"),
}
TRAINING = {
    "fit": "train (or resume with --ckpt_path last) from a config",
    "validate": "held-out loss, bits per byte and eval tasks of a checkpoint",
    "test": "the same, the held-out figures logged as test/*",
}
USAGE = (
    "usage: pretrain {fit,validate,test,prepare,generate,export,benchmark,compare} ...\n\ncommands:\n"
    + "\n".join(f"  {name:<10} {what}" for name, what in {**TRAINING, **{k: v[1] for k, v in TOOLS.items()}}.items())
    + "\n\n`pretrain COMMAND --help` shows a command's options."
)


def main(argv: list[str] | None = None) -> None:
    """The ``pretrain`` command (and ``python main.py``)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv else None
    if command in ("-h", "--help"):
        print(USAGE)
    elif command in TOOLS:
        run_command(importlib.import_module(TOOLS[command][0]).main, argv[1:])
    elif command in TRAINING or (command or "").startswith("-"):  # LightningCLI's own options: --config X fit
        run_command(train, argv)
    else:
        print(USAGE, file=sys.stderr)
        known = ", ".join([*TRAINING, *TOOLS])
        what = f"unknown command {command!r}" if command else "a command is missing"
        print(f"error: {what}; choose one of {known}.", file=sys.stderr)
        sys.exit(2)
