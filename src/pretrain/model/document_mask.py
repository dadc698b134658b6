"""Document masking: attention that stays inside each document of a packed block.

Blocks are cut from a stream of documents, each closed by the end-of-text token. With plain causal
attention a token also attends to the unrelated documents before it in its block; with a document
mask it attends only to the earlier tokens of its own document (Llama 3, OLMo-core, torchtitan), so
every document is learnt as if it were alone. The end-of-text token belongs to the document it
closes. The mask is computed from the token ids on the device, never read back by the host.

On CUDA the mask is a FlexAttention ``BlockMask``: the kernel skips the blocks of (query, key)
pairs that the mask leaves out. Elsewhere (the CPU tests and quickstart) it is a boolean tensor
that ``scaled_dot_product_attention`` applies. Both are built outside any compiled region.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

AttentionMask = torch.Tensor | BlockMask  # (B, 1, T, T) booleans, or FlexAttention's block-sparse form
AttentionMaskName = Literal["causal", "document"]


@functools.cache
def compiled_create_block_mask() -> Callable[..., BlockMask]:
    """Compiled once, on first use on CUDA: in eager mode create_block_mask evaluates the mask over every
    (query, key) pair in Python-level chunks, which would cost more than the attention it saves."""
    return torch.compile(create_block_mask)


def document_ids(inputs: torch.Tensor, eot_id: int) -> torch.Tensor:
    """(B, T) inputs -> (B, T) int32: the index, within its row, of the document each token belongs to
    (the end-of-text tokens before it)."""
    ends = (inputs.int() == eot_id).int()  # shards may hold uint16, which few CUDA kernels take
    return ends.cumsum(dim=1, dtype=torch.int32) - ends


def document_mask(inputs: torch.Tensor, eot_id: int, block_sparse: bool | None = None) -> AttentionMask:
    """The mask letting each token of ``inputs`` (B, T) attend to itself and the earlier tokens of its document.

    ``block_sparse``: a FlexAttention ``BlockMask`` (the default on CUDA) rather than a boolean tensor.
    """
    ids = document_ids(inputs, eot_id)
    if block_sparse is None:
        block_sparse = inputs.is_cuda
    if not block_sparse:
        causal = torch.ones(ids.size(1), ids.size(1), dtype=torch.bool, device=ids.device).tril()
        return ((ids[:, :, None] == ids[:, None, :]) & causal).unsqueeze(1)  # (B, 1, T, T)

    def same_document_and_earlier(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return (kv <= q) & (ids[b, q] == ids[b, kv])

    build = compiled_create_block_mask() if inputs.is_cuda else create_block_mask
    return build(same_document_and_earlier, ids.size(0), None, ids.size(1), ids.size(1), device=ids.device)


def attended_pairs(inputs: torch.Tensor, eot_id: int) -> torch.Tensor:
    """How many (query, key) pairs the document mask keeps, summed over the batch (a 0-d int64 tensor on the
    device): for each token, its position within its document plus one. Causal attention keeps
    B x T (T + 1) / 2; the ratio is the share of attention work document masking leaves to do."""
    ids = document_ids(inputs, eot_id)
    positions = torch.arange(ids.size(1), device=ids.device).expand_as(ids)
    starts_document = torch.ones_like(ids, dtype=torch.bool)
    starts_document[:, 1:] = ids[:, 1:] != ids[:, :-1]
    document_start = torch.where(starts_document, positions, 0).cummax(dim=1).values
    return (positions - document_start + 1).sum()
