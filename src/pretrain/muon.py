"""Muon for the hidden matrices, AdamW for the embedding, the LM head and the gains: one optimizer.

Muon (Keller Jordan, 2024) replaces each hidden matrix's momentum by the nearest semi-orthogonal matrix
(all singular values near 1) before the step, so every direction of the update moves at the same rate;
modded-nanogpt's speed records train with it. It suits the matrices inside the blocks only: the
embedding and the head map tokens, and gains are vectors, so those keep AdamW.

One optimizer rather than two, so that the LR schedule, gradient clipping, the step guard and
checkpoints see a single object. The AdamW part is ``torch.optim.AdamW`` itself (fused where asked),
run on this optimizer's own groups and state.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Replicate
from torch.optim import Optimizer

from pretrain.errors import UserError

# The quintic Newton-Schulz coefficients of Keller Jordan's Muon: the steepest slope at zero that still
# brings every singular value into about [0.7, 1.2] in five steps.
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrix: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """An approximation of U V^T for ``matrix`` = U S V^T, by Newton-Schulz iterations (bf16 on GPUs)."""
    a, b, c = NEWTON_SCHULZ
    x = matrix.to(torch.bfloat16 if matrix.is_cuda else torch.float32)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (x.norm() + eps)  # the spectral norm is at most the Frobenius norm: now at most 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(matrix.dtype)


class MuonWithAdamW(Optimizer):
    """Muon on the parameter groups marked ``hidden_matrices`` (``pretrain.optim.param_groups`` marks the
    Linear weights inside the blocks), AdamW on the others.

    Muon's step: momentum (Nesterov's by default), orthogonalised, scaled by sqrt(max(1, rows / cols))
    so that tall matrices move as far per entry as square ones, with decoupled weight decay. The fused
    query-key-value matrix is orthogonalised whole. Under FSDP2 each rank gathers the full momentum of a
    matrix, orthogonalises it and keeps its own rows; FSDP1, whose flat shards are no matrices, is refused.

    With ``fused``, a step is skipped on the device where ``found_inf`` is set (the step guard), as fused
    AdamW does; otherwise the guard drops a bad step's gradients, and parameters without one are left alone.

    Args:
        lr: Muon's learning rate (the hidden matrices).
        momentum: Muon's momentum.
        nesterov: Nesterov momentum for Muon.
        ns_steps: Newton-Schulz iterations.
        adamw_lr: AdamW's learning rate (embedding, head, gains). A schedule scales both LRs alike.
        betas, eps, fused: AdamW's.
        weight_decay: Decoupled weight decay of both parts, where a group does not set its own (the gains: 0).
    """

    def __init__(self, params: Any, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 adamw_lr: float = 0.003, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1, fused: bool | None = None) -> None:  # fmt: skip
        groups = list(params)
        if not all(isinstance(group, dict) for group in groups) or not any(g.get("hidden_matrices") for g in groups):
            raise UserError(
                "MuonWithAdamW needs the model's parameter groups with the hidden matrices marked "
                "(pretrain.optim.param_groups), as model.optimizer receives them."
            )
        settings = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "ns_steps": ns_steps}
        muon = [{**settings, "weight_decay": weight_decay, **group} for group in groups if group.get("hidden_matrices")]
        adamw = [{"lr": adamw_lr, "weight_decay": weight_decay, **group} for group in groups
                 if not group.get("hidden_matrices")]  # fmt: skip
        for param in (p for group in muon for p in group["params"]):
            if param.ndim != 2:
                raise UserError(
                    f"Muon needs whole matrices, and got a parameter of shape {tuple(param.shape)}: FSDP1 "
                    "(trainer.strategy: fsdp) flattens parameters into 1-D shards. Use FSDP2 (configs/fsdp2.yaml), "
                    "DDP or one device, or AdamW."
                )
        super().__init__(muon + adamw, {"lr": lr, "weight_decay": weight_decay, "fused": fused})
        self.muon_groups = len(muon)
        # The groups' dicts are shared: the schedule's LRs and loaded state reach AdamW as they reach Muon.
        self._adamw = torch.optim.AdamW(
            self.param_groups[self.muon_groups :], lr=adamw_lr, betas=betas, eps=eps, weight_decay=weight_decay,
            fused=fused,
        )  # fmt: skip
        self._adamw.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if any("momentum" not in group for group in state_dict["param_groups"][: self.muon_groups]):
            raise UserError(
                "This checkpoint's optimizer state is another optimizer's, which Muon cannot continue. Keep that "
                "optimizer to resume, or start a run from its weights: --model.init_from <checkpoint>."
            )
        super().load_state_dict(state_dict)  # makes new group dicts and state: share them again
        self._adamw.param_groups = self.param_groups[self.muon_groups :]
        self._adamw.state = self.state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        skip = getattr(self, "found_inf", None)  # set by the step guard (fused only): 1.0 leaves all as it is
        if self.defaults["fused"]:
            self._adamw.found_inf = skip
        for group in self.param_groups[: self.muon_groups]:
            for param in group["params"]:
                if param.grad is not None:
                    self._muon_update(param, group, skip)
        self._adamw.step()
        return loss

    def _muon_update(self, param: torch.Tensor, group: dict[str, Any], skip: torch.Tensor | None) -> None:
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param.grad)
        buffer, momentum = state["momentum_buffer"], group["momentum"]
        new_buffer = buffer * momentum + param.grad
        direction = param.grad + momentum * new_buffer if group["nesterov"] else new_buffer
        update = _orthogonalize_whole(direction, group["ns_steps"])
        lr, rows, cols = group["lr"], param.size(0), param.size(1)
        step = update * (lr * math.sqrt(max(1.0, rows / cols)))
        shrink = 1 - lr * group["weight_decay"]
        if skip is None:
            buffer.copy_(new_buffer)
            param.mul_(shrink).sub_(step)
            return
        keep = skip.bool()
        buffer.copy_(torch.where(keep, buffer, new_buffer))
        param.copy_(torch.where(keep, param, param * shrink - step))


def _orthogonalize_whole(direction: torch.Tensor, steps: int) -> torch.Tensor:
    """``orthogonalize`` a matrix, or the whole of an FSDP2-sharded one, returning this rank's shard."""
    if not isinstance(direction, DTensor):
        return orthogonalize(direction, steps)
    whole = orthogonalize(direction.full_tensor(), steps)
    replicated = DTensor.from_local(whole, direction.device_mesh, [Replicate()] * direction.device_mesh.ndim)
    return replicated.redistribute(direction.device_mesh, direction.placements)  # each rank keeps its rows
