"""Sharded checkpoint folders (torch.distributed.checkpoint) read without running code from them.

PyTorch's reader unpickles the folder's index (``.metadata``) without restriction and every
non-tensor entry with ``weights_only=False``. ``check_sharded_folder`` reads the index with only the
types an index holds and every non-tensor entry weights-only first, and refuses the folder if
either needs more; ``read_sharded_weights`` then reads the weights through the checked index.
"""

from __future__ import annotations

import io
import pickle
import types
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata

from pretrain._compat import PurePythonUnpickler, load_into_empty, storage_info_class
from pretrain.errors import UserError

_StorageInfo = storage_info_class()

# Every global an index needs besides the record types of torch.distributed.checkpoint.metadata and
# torch's dtypes, by module.
_INDEX_GLOBALS = {
    _StorageInfo.__module__: {_StorageInfo.__name__},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
}
_RECORD_MODULES = {dcp_metadata.__name__, _StorageInfo.__module__}


class _IndexUnpickler(PurePythonUnpickler):  # the pure-Python one: its steps can be overridden one by one
    dispatch: ClassVar[dict] = dict(PurePythonUnpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        # Judged before anything is imported or looked up. No dotted names: pickle would follow them
        # through attributes (e.g. from a module to the modules it imported).
        if "." in name or not _index_global(module, name):
            raise pickle.UnpicklingError(f"{module}.{name}")
        return super().find_class(module, name)

    def load_build(self) -> None:
        """Set state on records only: on a class or function it would rewrite them for the whole process."""
        target = self.stack[-2]
        if isinstance(target, (type, types.FunctionType, types.BuiltinFunctionType)) or (
            type(target).__module__ not in _RECORD_MODULES
        ):
            raise pickle.UnpicklingError(f"state set on {target!r}")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def _index_global(module: str, name: str) -> bool:
    if name in _INDEX_GLOBALS.get(module, ()):
        return True
    if module == "torch":
        return isinstance(getattr(torch, name, None), torch.dtype)
    if module == dcp_metadata.__name__:  # the record types defined there, nothing it imported
        found = getattr(dcp_metadata, name, None)
        return isinstance(found, type) and found.__module__ == module
    return False


def check_sharded_folder(folder: Path) -> dict:
    """The folder's index, once its index and non-tensor entries have been read without running code.

    Raises UserError naming what would have run code (or what is not a checkpoint index).
    """
    index = folder / ".metadata"
    if not index.is_file():
        raise UserError(f"{folder} is not a sharded checkpoint: it has no .metadata file.")
    try:
        metadata = _IndexUnpickler(io.BytesIO(index.read_bytes())).load()
    except Exception:  # judged below, with the same reading
        metadata = None
    if isinstance(metadata, dcp_metadata.Metadata) and (missing := missing_data(folder, metadata)):
        raise UserError(
            f"The sharded checkpoint {folder} is incomplete: {missing}. A save that did not finish, or a copy "
            "that left files out; resume from another checkpoint (--ckpt_path last picks the newest whole one)."
        )
    try:
        metadata = _IndexUnpickler(io.BytesIO(index.read_bytes())).load()
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise pickle.UnpicklingError(f"a {type(metadata).__name__!r} object instead of an index")
        _check_non_tensor_entries(folder, metadata)
    except Exception as error:  # anything that is not a well-formed index
        raise UserError(
            f"The sharded checkpoint {folder} holds {error} in its index (.metadata) or its entries, which is "
            "not what a checkpoint holds and could run code when read, so it was not loaded. If you trust "
            "where it came from, --ckpt_path accepts it with --weights_only false."
        ) from None
    return metadata


def missing_data(folder: Path, metadata: Any) -> str | None:
    """What the index points at that is not in the folder: a missing data file, or one cut short."""
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size < size:
            return f"{name} holds {path.stat().st_size} bytes of the {size} its index reads"
    return None


def _check_non_tensor_entries(folder: Path, metadata: Any) -> None:
    """Load every non-tensor entry weights-only, as PyTorch's reader will load it without restriction."""
    for where, info in metadata.storage_data.items():
        if Path(info.relative_path).name != info.relative_path:
            raise pickle.UnpicklingError(f"a data file outside the folder ({info.relative_path!r})")
        if not isinstance(metadata.state_dict_metadata.get(where.fqn), dcp_metadata.BytesStorageMetadata):
            continue
        if info.transform_descriptors:
            raise pickle.UnpicklingError(f"an entry stored with transforms {list(info.transform_descriptors)}")
        with open(folder / info.relative_path, "rb") as file:
            file.seek(info.offset)
            entry = file.read(info.length)
        try:
            torch.load(io.BytesIO(entry), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise pickle.UnpicklingError(f"an entry {where.fqn!r} that cannot be loaded weights-only") from None


class _CheckedIndexReader(FileSystemReader):
    """Reads the folder through an index already checked, instead of unpickling it again."""

    def __init__(self, folder: Path, metadata: Any) -> None:
        super().__init__(folder)
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        if getattr(self._metadata, "storage_meta", None) is None:
            self._metadata.storage_meta = dcp_metadata.StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


def read_sharded_weights(folder: Path, keys: set[str]) -> dict[str, Any]:
    """The entries under ``keys`` (e.g. the weights, not the optimizer's state) of a sharded folder."""
    metadata = check_sharded_folder(folder)
    entries: dict[str, Any] = {}
    reader = _CheckedIndexReader(folder, metadata)
    load_into_empty(entries, reader, keys)
    return entries
