"""Every private Lightning / litdata / torch name the project uses still exists in the installed versions.

A failure names the name, where the project uses it, and the versions on which it was last checked: the fix
starts in src/pretrain/_compat.py."""

from __future__ import annotations

import ast
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
from pretrain.checkpointing.callback import PretrainCheckpoint
from pretrain.train import FSDP2Strategy, WarmupCosineLR

SOURCE = Path(_compat.__file__).parent


def upgrade_message(name: str, used_by: str) -> str:
    installed = {package: version(package) for package in _compat.CHECKED_ON}
    return (
        f"{name} is gone in {installed} (checked on {_compat.CHECKED_ON}); it is used by {used_by}: "
        "adapt src/pretrain/_compat.py"
    )


@pytest.mark.parametrize("name", list(_compat.PRIVATE_NAMES))
def test_each_private_name_still_exists(name: str) -> None:
    try:
        _compat.private(name)
    except (ImportError, AttributeError):
        pytest.fail(upgrade_message(name, _compat.PRIVATE_NAMES[name]))


def test_the_private_attributes_exist_on_real_objects(tmp_path: Path) -> None:
    """The private attributes set or read on instances, as a real fit leaves them."""
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoint := PretrainCheckpoint(dirpath=tmp_path)],
        accelerator="cpu",
    )
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
        "LightningModule": model,
        "LRScheduler": WarmupCosineLR(torch.optim.SGD(model.parameters(), lr=0.1), warmup_steps=1, max_steps=2),
    }
    for name, used_by in _compat.PRIVATE_ATTRIBUTES.items():
        owner, attribute = name.split(".")
        assert hasattr(owners[owner], attribute), upgrade_message(name, used_by)


def own_private_names(modules: list[Path]) -> set[str]:
    """Private names the project defines itself: functions, classes, methods, module-level names, and the
    attributes its own ``__init__`` methods set on ``self``."""
    names = set()
    for path in modules:
        tree = ast.parse(path.read_text())
        for statement in tree.body:
            if isinstance(statement, ast.Assign):
                names.update(target.id for target in statement.targets if isinstance(target, ast.Name))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
                if node.name == "__init__":
                    stored = (
                        n for n in ast.walk(node) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)
                    )
                    names.update(attribute.attr for attribute in stored)
    return {name for name in names if is_private(name)}


def private_reaches(path: Path, own: set[str]) -> list[str]:
    """Each place in ``path`` that imports, reads, sets or looks up (``getattr`` and kin) another package's
    private name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.split(".")[0] not in ("pretrain", "__future__")
        ):
            names = [*node.module.split("."), *(alias.name for alias in node.names)]
        elif isinstance(node, ast.Import):
            names = [part for alias in node.names for part in alias.name.split(".")]
        elif isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in LOOKUPS:
            names = [
                arg.value for arg in node.args[1:2] if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
            ]
        private = [name for name in names if is_private(name) and name not in own | PUBLIC_UNDERSCORED]
        if private:
            found.append(f"{path}:{node.lineno}: {ast.unparse(node)[:100]}")
    return found


LOOKUPS = ("getattr", "setattr", "hasattr", "delattr")
PUBLIC_UNDERSCORED = {"_exit"}  # os._exit: documented, and how a forked worker ends without running cleanup


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_module_but_the_compatibility_layer_reaches_a_private_name() -> None:
    """Private names of other packages appear in src/pretrain only in _compat.py: in every module of every
    package, as an import, a dotted name or a ``getattr``-style lookup."""
    modules = [path for path in SOURCE.rglob("*.py") if path.name != "_compat.py"]
    assert len(modules) > 40, "the scan must see every package"
    own = own_private_names(modules)
    assert [reach for path in modules for reach in private_reaches(path, own)] == []


def test_the_scan_finds_each_kind_of_private_reach(tmp_path: Path) -> None:
    """The scan above catches an import, a dotted name and a lookup, and lets the project's own names be."""
    module = tmp_path / "example.py"
    module.write_text(
        "from torch._inductor import config\n"
        "import torch._dynamo\n"
        "x = torch.cpu._is_amx_tile_supported()\n"
        "y = getattr(torch.cpu, '_is_amx_tile_supported', None)\n"
        "class Own:\n"
        "    def __init__(self):\n"
        "        self._mine = 1\n"
        "    def read(self):\n"
        "        return self._mine, self._step_count\n"
    )
    lines = sorted(reach.split(":")[1] for reach in private_reaches(module, own_private_names([module])))
    assert lines == ["1", "2", "3", "4", "9"]
