"""How the model is built for training, on one device or sharded, and FSDP2 through Lightning.

FSDP2 (``fully_shard``) runs through Lightning's ModelParallelStrategy: the model is built on the meta
device, sharded block by block over the data-parallel ranks, then materialised and initialised in place."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from functools import partial

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from pretrain._compat import set_data_parallel_size
from pretrain.model.config import LlamaConfig
from pretrain.model.llama import Llama, build_model
from pretrain.model.losses import LossTerms, loss_of_logits, next_token_loss

LossFn = Callable[..., LossTerms]  # next_token_loss, compiled or not


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
            data_parallel_size=1,
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            timeout=timeout,
        )

    def setup_environment(self) -> None:
        set_data_parallel_size(self, self.num_nodes * self.num_processes)
        super().setup_environment()


def build_training_model(
    config: LlamaConfig,
    seed: int,
    device: torch.device,
    mesh: DeviceMesh | None = None,
    param_dtype: torch.dtype | None = None,
    compile_mode: str | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> tuple[Llama, LossFn]:
    """The model and its loss function as training runs them; the benchmark's bare loop uses it too.

    Without a ``mesh``, on ``device`` (a meta default device means the CPU; empty ``weights``: left on the meta
    device, for FSDP1 to fill from rank 0): with a ``compile_mode`` the model and its loss are compiled as one
    graph, so the fp32 upcast of the logits fuses into the softmax. With a ``mesh``, sharded
    (``build_sharded_model``): the blocks are compiled one by one and the loss on its own.
    """
    if mesh is None:
        if weights == {}:  # FSDP1's ranks but 0 (``receive_weights_at_wrap``)
            with torch.device("meta"):
                model = Llama(config)
        else:
            model = build_model(config, "cpu" if device.type == "meta" else device, seed, weights)
        return model, torch.compile(next_token_loss, mode=compile_mode) if compile_mode else next_token_loss
    model = build_sharded_model(config, mesh, device, seed, param_dtype, compile_mode, weights)
    if compile_mode is None:
        return model, next_token_loss
    return model, partial(next_token_loss, logits_loss=torch.compile(loss_of_logits, mode=compile_mode))


def build_sharded_model(
    config: LlamaConfig,
    mesh: DeviceMesh,
    device: torch.device,
    seed: int,
    param_dtype: torch.dtype | None = None,
    compile_mode: str | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Llama:
    """A Llama whose parameters are sharded over ``mesh``, with the same values a single device gets (or
    ``weights``, read on rank 0 alone: no full copy on the other ranks).

    Each block is its own FSDP unit (gathered just before it runs, freed after); the embedding,
    final norm and LM head form the root unit. With ``param_dtype`` the gathered weights are cast
    once per step (bf16 halves the all-gather), while gradients are reduced in fp32. With a
    ``compile_mode`` (``torch.compile``'s) each block is compiled: FSDP's communication stays
    outside the compiled graphs.
    """
    with torch.device("meta"):
        model = Llama(config)
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
    if weights is not None:  # rank 0 holds the full weights (the others an empty dict): each rank gets its shard
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, weights, options=options)
    return model


def receive_weights_at_wrap(strategy: FSDPStrategy) -> None:
    """FSDP1 (Lightning's FSDPStrategy) gives each unit rank 0's values as it wraps it (``sync_module_states``),
    before sharding it. The other ranks' models stay on the meta device until then, each unit made real on its own
    (``param_init_fn``), so rank 0 alone ever holds the whole model: a 8B start is not 8 copies of 32 GB per node."""
    strategy.kwargs.update(sync_module_states=True, param_init_fn=MadeReal(strategy.root_device))


class MadeReal:
    """FSDP1's ``param_init_fn``: gives a module's own meta-device tensors (not its children's) memory on ``device``,
    values unset. A tensor shared by two modules (a tied head) gets one, so the tie holds: ``to_empty`` would split it.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.made: dict[torch.nn.Parameter, torch.nn.Parameter] = {}

    def __call__(self, module: torch.nn.Module) -> None:
        for name, param in module.named_parameters(recurse=False):
            if param.is_meta:
                if param not in self.made:
                    empty = torch.empty_like(param, device=self.device)
                    self.made[param] = torch.nn.Parameter(empty, param.requires_grad)
                setattr(module, name, self.made[param])
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_meta:
                setattr(module, name, torch.empty_like(buffer, device=self.device))


def clip_global_grad_norm(wrapped: torch.nn.Module, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients by their norm over every rank's shard, and return that norm (on the device).

    ``wrapped`` is the model as the strategy wrapped it: FSDP1 flattens the shards, so only its own
    method sees them all; FSDP2's norm comes as a DTensor already reduced over the shards.
    """
    if isinstance(wrapped, FullyShardedDataParallel):
        return wrapped.clip_grad_norm_(max_norm)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
