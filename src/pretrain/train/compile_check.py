"""Whether ``torch.compile`` can run here: ``model.compile: auto`` compiles where it can and runs eagerly elsewhere."""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info

from pretrain._compat import has_cpp_compiler
from pretrain.errors import UserError

CompileSetting = bool | Literal["auto"]


def missing_compiler(device: torch.device) -> str | None:
    """What ``torch.compile`` lacks on ``device`` (None: nothing): on a CPU, inductor builds C++ kernels, so it
    needs a C++ compiler, which a fresh laptop or a slim container may not have."""
    if device.type != "cpu":
        return None
    if has_cpp_compiler():
        return None
    return "a C++ compiler (inductor builds the CPU kernels with one; e.g. apt install g++)"


def compiles(setting: CompileSetting, device: torch.device) -> bool:
    """Whether to compile on ``device``: ``auto`` compiles where nothing is missing; ``true`` requires it."""
    if setting is False:
        return False
    missing = missing_compiler(device)
    if missing is None:
        return True
    if setting == "auto":
        rank_zero_info(f"model.compile: auto runs the model eagerly: torch.compile on {device.type} needs {missing}.")
        return False
    raise UserError(
        f"model.compile: true needs {missing}, and none was found. Install one, or set model.compile: auto "
        "(compile where possible) or false."
    )
