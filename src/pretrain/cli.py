"""The command line: LightningCLI wired for pretraining (``python main.py fit --config ...``)."""

from __future__ import annotations

import logging
import sys

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from pretrain.data import PretrainData
from pretrain.errors import UserError
from pretrain.module import PretrainModule


class PretrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Always checkpoint, configurable as e.g. --checkpoint.every_n_train_steps 50.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
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

    def before_instantiate_classes(self) -> None:
        """A schedule with ``max_steps`` unset ends where training ends: ``trainer.max_steps``."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        scheduler = config.model.lr_scheduler
        init_args = getattr(scheduler, "init_args", None)
        if init_args is not None and "max_steps" in init_args and init_args.max_steps is None:
            init_args.max_steps = config.trainer.max_steps


def main(args: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        PretrainCLI(
            PretrainModule,
            PretrainData,
            args=args,
            auto_configure_optimizers=False,
            trainer_defaults={"max_epochs": -1},
        )
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
