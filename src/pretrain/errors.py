"""The errors the command line reports in one line, ``error: ...``, never as a traceback, and its one handler."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn


class ReportedError(Exception):
    """An error whose message says what happened and what to do; the command prints it after ``label`` and
    exits with ``exit_status``."""

    exit_status = 2
    label = "error"


class UserError(ReportedError):
    """Bad input or configuration. The message names the problem and how to fix it."""


class SourcesNotFound(UserError):
    """A data source names nothing present here (a finished build of it may still be served)."""


class TrainingDiverged(ReportedError):
    """The run stopped itself because its loss stayed non-finite; its last good state is saved."""

    exit_status = 1


class LoaderWorkerDied(ReportedError):
    """A data loader worker process died for a reason of its own (memory, a crash): the run cannot go on."""

    exit_status = 1


class Interrupted(ReportedError):
    """Ctrl-C: the run saved its step and stopped, as a shell expects of an interrupted command (128 + SIGINT)."""

    exit_status = 130
    label = "interrupted"


class CommandParser(argparse.ArgumentParser):
    """argparse reporting a mistake as this project does: one ``error: ...`` line, status 2."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message}; `{self.prog} --help` lists the options.")


def run_command(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a command's ``main``, turning a reported error into its one line and exit status."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException  # here: this module stays light

    try:
        main(argv)
    except ReportedError as error:
        print(f"{error.label}: {error}", file=sys.stderr)
        sys.exit(error.exit_status)
    except MisconfigurationException as error:  # Lightning's word for settings that cannot work together
        print(f"error: {error}", file=sys.stderr)
        sys.exit(UserError.exit_status)
