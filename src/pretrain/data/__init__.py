"""Raw text -> tokenizer + token shards (sources, readers, tokenizer, build, mixture) and the
LightningDataModule that serves them (datamodule, block_order, block_reader, block_loader, remote, loader_workers)."""

from pretrain.data.datamodule import PretrainData

__all__ = ["PretrainData"]
