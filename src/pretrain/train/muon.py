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

from pretrain._compat import cpu_has_amx
from pretrain.errors import UserError

# The quintic Newton-Schulz coefficients of Keller Jordan's Muon: the steepest slope at zero that still
# brings every singular value into about [0.7, 1.2] in five steps.
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware multiplies it natively (GPUs; CPUs with AMX), fp32 elsewhere, where bf16 is no
    faster or far slower (docs/design.md#small-choices-measured)."""
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_amx() else torch.float32


def orthogonalize(matrices: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """An approximation of U V^T for each ``matrix`` = U S V^T of ``matrices`` (rows, cols) or (N, rows, cols),
    by Newton-Schulz iterations in ``newton_schulz_dtype``."""
    a, b, c = NEWTON_SCHULZ
    x = matrices.to(newton_schulz_dtype(matrices.device))
    single = x.ndim == 2
    if single:
        x = x.unsqueeze(0)
    tall = x.size(1) > x.size(2)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(1, 2), keepdim=True) + eps)  # the spectral norm is at most the Frobenius norm: now <= 1
    for _ in range(steps):
        gram = x @ x.mT
        polynomial = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b * gram + c * gram @ gram, one call
        x = torch.baddbmm(x, polynomial, x, beta=a)  # a * x + polynomial @ x
    x = x.mT if tall else x
    return (x.squeeze(0) if single else x).to(matrices.dtype)


def orthogonalize_each(directions: list[torch.Tensor], steps: int) -> list[torch.Tensor]:
    """``orthogonalize`` each matrix, those of one shape (transposed where tall) in one batched call, returned in
    ``newton_schulz_dtype``: a few large calls instead of many small ones (docs/design.md#small-choices-measured).
    Each matrix is copied into its batch already cast, in one pass."""
    results: list[torch.Tensor | None] = [None] * len(directions)
    tall = [direction.size(0) > direction.size(1) for direction in directions]
    same_shape: dict[tuple[Any, ...], list[int]] = {}
    for index, direction in enumerate(directions):
        if isinstance(direction, DTensor):
            results[index] = _orthogonalize_whole(direction, steps)
        else:
            rows, cols = sorted(direction.shape) if tall[index] else direction.shape
            same_shape.setdefault((rows, cols, direction.device), []).append(index)
    for (rows, cols, device), indices in same_shape.items():
        batch = torch.empty(len(indices), rows, cols, dtype=newton_schulz_dtype(device), device=device)
        for slot, index in zip(batch, indices, strict=True):
            slot.copy_(directions[index].mT if tall[index] else directions[index])
        for index, result in zip(indices, orthogonalize(batch, steps).unbind(0), strict=True):
            results[index] = result.mT if tall[index] else result
    return results  # type: ignore[return-value]


class MuonWithAdamW(Optimizer):
    """Muon on the parameter groups marked ``hidden_matrices`` (``pretrain.train.param_groups.param_groups`` marks the
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

    def __init__(
        self,
        params: Any,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adamw_lr: float = 0.003,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        fused: bool | None = None,
    ) -> None:
        groups = list(params)
        if not all(isinstance(group, dict) for group in groups) or not any(g.get("hidden_matrices") for g in groups):
            raise UserError(
                "MuonWithAdamW needs the model's parameter groups with the hidden matrices marked "
                "(pretrain.train.param_groups.param_groups), as model.optimizer receives them."
            )
        settings = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "ns_steps": ns_steps}
        muon = [{**settings, "weight_decay": weight_decay, **group} for group in groups if group.get("hidden_matrices")]
        adamw = [
            {"lr": adamw_lr, "weight_decay": weight_decay, **group}
            for group in groups
            if not group.get("hidden_matrices")
        ]
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
            self.param_groups[self.muon_groups :],
            lr=adamw_lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            fused=fused,
        )
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
        keep = None if skip is None else skip.bool()
        for group in self.param_groups[: self.muon_groups]:
            params = [param for param in group["params"] if param.grad is not None]
            momenta = [self._momentum(param, group, in_place=keep is None) for param in params]
            updates = orthogonalize_each([direction for _, direction in momenta], group["ns_steps"])
            for param, (new_buffer, _), update in zip(params, momenta, updates, strict=True):
                self._apply(param, group, new_buffer, update, keep)
        self._adamw.step()
        return loss

    def _momentum(
        self, param: torch.Tensor, group: dict[str, Any], in_place: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The new momentum buffer (written over the old one ``in_place``) and the direction to orthogonalise
        (Nesterov's look-ahead, or the buffer)."""
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param.grad)
        momentum, buffer = group["momentum"], state["momentum_buffer"]
        new_buffer = torch.add(param.grad, buffer, alpha=momentum, out=buffer if in_place else None)
        return new_buffer, torch.add(param.grad, new_buffer, alpha=momentum) if group["nesterov"] else new_buffer

    def _apply(
        self,
        param: torch.Tensor,
        group: dict[str, Any],
        new_buffer: torch.Tensor,
        update: torch.Tensor,
        keep: torch.Tensor | None,
    ) -> None:
        """Decay and step ``param`` and keep ``new_buffer``; where ``keep`` is set, leave both as they are. Few
        elementwise calls: on small matrices each call's overhead costs more than its arithmetic."""
        lr, rows, cols = group["lr"], param.size(0), param.size(1)
        scale = -lr * math.sqrt(max(1.0, rows / cols))
        shrink = 1 - lr * group["weight_decay"]
        if keep is None:  # the buffer is new already
            param.mul_(shrink).add_(update, alpha=scale)
            return
        buffer = self.state[param]["momentum_buffer"]
        torch.where(keep, buffer, new_buffer, out=buffer)
        torch.where(keep, param, param.mul(shrink).add_(update, alpha=scale), out=param)


def _orthogonalize_whole(direction: torch.Tensor, steps: int) -> torch.Tensor:
    """``orthogonalize`` a matrix, or the whole of an FSDP2-sharded one, returning this rank's shard."""
    if not isinstance(direction, DTensor):
        return orthogonalize(direction, steps)
    whole = orthogonalize(direction.full_tensor(), steps)
    replicated = DTensor.from_local(whole, direction.device_mesh, [Replicate()] * direction.device_mesh.ndim)
    return replicated.redistribute(direction.device_mesh, direction.placements)  # each rank keeps its rows
