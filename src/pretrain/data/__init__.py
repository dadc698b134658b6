"""The LightningDataModule and what it serves: the training stream (a seeded order over the whole build,
its reader and resumable loader), remote builds, loader workers; preparation lives in ``data.prepare``.

``PretrainData`` is imported on first use, so that ``generate`` and ``export``, which need only the
tokenizer, import neither Lightning nor litdata."""

from typing import Any

__all__ = ["PretrainData"]


def __getattr__(name: str) -> Any:
    if name == "PretrainData":
        from pretrain.data.datamodule import PretrainData

        return PretrainData
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
