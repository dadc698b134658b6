"""Every private Lightning / litdata / torch name the project uses still exists in the installed versions.

A failure names the name, where the project uses it, and the versions on which it was last checked: the fix
starts in src/pretrain/_compat.py."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from litdata.streaming.item_loader import TokensLoader
from litdata.streaming.writer import BinaryWriter
from torch.utils.data import DataLoader

from pretrain import _compat
from pretrain.checkpointing import PretrainCheckpoint
from pretrain.parallel import FSDP2Strategy

SOURCE = Path(_compat.__file__).parents[0]


def upgrade_message(name: str, used_by: str) -> str:
    installed = {package: version(package) for package in _compat.CHECKED_ON}
    return (f"{name} is gone in {installed} (checked on {_compat.CHECKED_ON}); it is used by {used_by}: "
            "adapt src/pretrain/_compat.py")  # fmt: skip


@pytest.mark.parametrize("name", list(_compat.PRIVATE_NAMES))
def test_each_private_name_still_exists(name: str) -> None:
    try:
        _compat.private(name)
    except (ImportError, AttributeError):
        pytest.fail(upgrade_message(name, _compat.PRIVATE_NAMES[name]))


def test_the_private_attributes_exist_on_real_objects(tmp_path: Path) -> None:
    """The private attributes set or read on instances, as a real fit leaves them."""
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[checkpoint := PretrainCheckpoint(dirpath=tmp_path)], accelerator="cpu")  # fmt: skip
    model = BoringModel()
    trainer.fit(model, DataLoader(torch.randn(4, 32), batch_size=2))
    writer = BinaryWriter(str(tmp_path / "chunks"), chunk_bytes="1MB", item_loader=TokensLoader())
    owners = {
        "Trainer": trainer,
        "_SignalConnector": trainer._signal_connector,
        "_TrainingEpochLoop": trainer.fit_loop.epoch_loop,
        "ModelParallelStrategy": FSDP2Strategy(),
        "BinaryWriter": writer,
        "ModelCheckpoint": checkpoint,
    }
    for name, used_by in _compat.PRIVATE_ATTRIBUTES.items():
        owner, attribute = name.split(".")
        assert hasattr(owners[owner], attribute), upgrade_message(name, used_by)


def test_no_module_but_the_compatibility_layer_reaches_a_private_name() -> None:
    """Private names of other packages appear in src/pretrain only in _compat.py."""
    imported_privately = []
    for path in SOURCE.glob("*.py"):
        if path.name == "_compat.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith(("from ", "import ")) and " import _" in stripped:
                imported_privately.append(f"{path.name}:{number}: {stripped}")
    assert imported_privately == []
