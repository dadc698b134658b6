"""Optimizer parameter groups: weight decay for the matrices, none for the gains."""

from __future__ import annotations

from torch import nn


def param_groups(model: nn.Module) -> list[dict]:
    """Three groups: the Linear weights inside the blocks (marked ``hidden_matrices``, for Muon), the embedding
    and LM head, both with the optimizer's weight decay, and the norm gains (and biases) without.

    Decaying RMSNorm gains pulls them toward zero for no benefit, which is why every modern
    LM recipe exempts them. Chosen by the layer a parameter belongs to, not by its shape: under
    FSDP1 every parameter is a flat 1-D shard by the time the optimizer is built.
    """
    hidden, token_maps, vectors, seen = [], [], [], set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:  # a tied weight is listed once
                continue
            seen.add(id(param))
            if name != "weight" or not isinstance(module, (nn.Linear, nn.Embedding)):
                vectors.append(param)
            elif isinstance(module, nn.Linear) and not module_name.endswith("lm_head"):
                hidden.append(param)
            else:
                token_maps.append(param)
    return [
        {"params": hidden, "hidden_matrices": True},
        {"params": token_maps},
        {"params": vectors, "weight_decay": 0.0},
    ]
