"""FSDP2 (``fully_shard``) through Lightning's ModelParallelStrategy: the model is built on the meta
device, sharded block by block over the data-parallel ranks, then materialised and initialised in place."""

from __future__ import annotations

from datetime import timedelta

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from pretrain.model import GPT, GPTConfig


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy as plain FSDP2: every GPU of every node holds a shard, no tensor
    parallelism. The data-parallel size follows ``trainer.devices`` x ``trainer.num_nodes``, so scaling
    out changes only those two numbers.

    Args:
        save_distributed_checkpoint: Each rank writes its own shard (a checkpoint is a folder), instead
            of gathering the full state on rank 0.
        timeout: How long ranks wait for each other in a collective before the run fails.
    """

    def __init__(self, save_distributed_checkpoint: bool = True, timeout: timedelta = timedelta(minutes=30)) -> None:
        super().__init__(
            data_parallel_size=1, tensor_parallel_size=1, save_distributed_checkpoint=save_distributed_checkpoint,
            timeout=timeout,
        )  # fmt: skip

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def build_sharded_model(
    config: GPTConfig,
    mesh: DeviceMesh,
    device: torch.device,
    seed: int,
    param_dtype: torch.dtype | None = None,
    compile_mode: str | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> GPT:
    """A GPT whose parameters are sharded over ``mesh``, with the same values a single device gets.

    Each block is its own FSDP unit (gathered just before it runs, freed after); the embedding,
    final norm and LM head form the root unit. With ``param_dtype`` the gathered weights are cast
    once per step (bf16 halves the all-gather), while gradients are reduced in fp32. With a
    ``compile_mode`` (``torch.compile``'s) each block is compiled: FSDP's communication stays
    outside the compiled graphs.
    """
    with torch.device("meta"):
        model = GPT(config)
    # Inputs are not cast: each block's activations already come in param_dtype, and the rotary table
    # it is handed stays fp32 (bf16 keeps about three significant digits of each cos and sin).
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
        if compile_mode is not None:
            block.compile(mode=compile_mode)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    model.to_empty(device=device)
    model.init_weights(seed)
    if weights is not None:  # every rank holds the full weights; each keeps its shard
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
    return model
