"""Sources are read-only: a ``data_dir`` that is a source, lies inside one or holds one is refused before anything
is written. Preparing there would remove or overwrite corpus files, or read the build back as corpus next time."""

from __future__ import annotations

import glob
from fnmatch import fnmatch
from pathlib import Path

from pretrain.data.prepare.sources import glob_root
from pretrain.data.prepare.url_sources import is_url
from pretrain.errors import UserError


def _glob_reaches(pattern: str, folder: Path) -> bool:
    """Whether the glob can match ``folder`` or a path inside it."""
    fixed = glob_root(pattern)
    base = fixed.resolve()
    if not folder.is_relative_to(base):
        return False
    inside = folder.relative_to(base).parts
    rest = Path(pattern).parts[len(fixed.parts) :]
    if "**" in rest:
        return True
    return len(rest) > len(inside) and all(fnmatch(name, part) for name, part in zip(inside, rest, strict=False))


def _overlap(source: str, data_dir: Path) -> str | None:
    """How ``data_dir`` meets the source ("is", "lies inside", "holds"), or None where it does not."""
    if source == "stdlib" or is_url(source):
        return None
    if glob.has_magic(source) and not Path(source).exists():
        if glob_root(source).resolve().is_relative_to(data_dir):
            return "holds"
        return "lies inside" if _glob_reaches(source, data_dir) else None
    path = Path(source).resolve()
    if path == data_dir:
        return "is"
    if data_dir.is_relative_to(path):
        return "lies inside"
    return "holds" if path.is_relative_to(data_dir) else None


def refuse_overlap(sources: list[str], data_dir: Path) -> None:
    """One error line naming ``data_dir``, the first source it meets, and the fix."""
    resolved = data_dir.resolve()
    for source in sources:
        if (relation := _overlap(source, resolved)) is not None:
            raise UserError(
                f"data.data_dir {data_dir} {relation} the source {source}: preparing it would write into the corpus "
                "(and remove files there). Sources are only read; point data.data_dir at a folder outside them."
            )
