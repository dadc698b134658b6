"""The causal language model in plain PyTorch (nothing here imports Lightning or litdata): its
configuration and presets, the Llama blocks, its losses, document masks, and the Hugging Face layout."""

from pretrain.model.config import PRESETS, LlamaConfig
from pretrain.model.llama import Block, Llama, build_model

__all__ = ["PRESETS", "Block", "Llama", "LlamaConfig", "build_model"]
