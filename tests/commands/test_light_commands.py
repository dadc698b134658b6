"""``generate`` and ``export`` read a checkpoint and a tokenizer only: they import neither Lightning nor litdata."""

from __future__ import annotations

import subprocess
import sys

from pretrain.checkpointing.loading import DATA_STATE_KEY
from pretrain.data import PretrainData

BLOCKED = ("lightning", "lightning_fabric", "pytorch_lightning", "litdata")
IMPORT_WITH_THOSE_BLOCKED = f"""
import sys

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is blocked")

sys.meta_path.insert(0, Refuse())
import pretrain.commands.export
import pretrain.commands.generate
"""


def test_generate_and_export_import_without_lightning_or_litdata() -> None:
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_WITH_THOSE_BLOCKED], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_block_catches_an_import_of_lightning() -> None:
    """The check above can fail: a module that imports Lightning is refused under it."""
    script = IMPORT_WITH_THOSE_BLOCKED.replace("import pretrain.commands.export", "import pretrain.train")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "lightning" in result.stderr and "is blocked" in result.stderr


def test_the_checkpoint_key_of_the_data_state_is_the_data_modules_name() -> None:
    """Lightning saves a data module's state under its class name; loading names it without importing it."""
    assert PretrainData.__qualname__ == DATA_STATE_KEY
