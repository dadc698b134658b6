"""Raw text -> tokenizer + token shards (sources, readers, tokenizer, build, mixture) and the
LightningDataModule that streams them (datamodule, mixture_loader, remote, loader_workers)."""

from pretrain.data.datamodule import PretrainData

__all__ = ["PretrainData"]
