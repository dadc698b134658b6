"""MuonWithAdamW: orthogonalised steps for the hidden matrices, AdamW for the rest, skips, state, refusals.
Under FSDP2: tests/e2e/test_parallel.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from pretrain.errors import UserError
from pretrain.model.config import LlamaConfig
from pretrain.model.llama import Llama
from pretrain.train.muon import MuonWithAdamW, newton_schulz_dtype, orthogonalize, orthogonalize_each
from pretrain.train.param_groups import param_groups
from pretrain.train.schedules import WarmupCosineLR

CONFIG = LlamaConfig(vocab_size=64, seq_len=8, d_model=32, n_layer=2, n_head=4, n_kv_head=2, ffn_dim=48)


def model_with_gradients(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    model = Llama(CONFIG)
    model.init_weights(seed)
    set_gradients(model, seed)
    return model


def set_gradients(model: Llama, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=generator)


@pytest.mark.parametrize("amx", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(24, 64), (64, 24), (32, 32)])
def test_orthogonalize_brings_every_singular_value_near_one_keeping_the_directions(shape, amx, monkeypatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)  # bf16 iterations where AMX is
    assert newton_schulz_dtype(torch.device("cpu")) == (torch.bfloat16 if amx else torch.float32)
    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    result = orthogonalize(matrix)
    assert result.shape == matrix.shape
    singular = torch.linalg.svdvals(result)
    assert singular.min() > 0.5 and singular.max() < 1.5  # Muon's quintic: about [0.7, 1.2], not exactly 1
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    cosine = (result * (u @ vh)).sum() / (result.norm() * (u @ vh).norm())
    assert cosine > 0.95


@pytest.mark.parametrize("amx", [False, True], ids=["fp32", "bf16"])
def test_matrices_orthogonalised_together_equal_each_alone(amx, monkeypatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    generator = torch.Generator().manual_seed(2)
    shapes = [(24, 64), (64, 24), (24, 64), (32, 32)]  # the tall one joins the wide ones, transposed
    matrices = [torch.randn(*shape, generator=generator) for shape in shapes]
    tolerance = 2e-2 if amx else 1e-5
    for matrix, together in zip(matrices, orthogonalize_each(matrices, 5), strict=True):
        assert together.shape == matrix.shape
        assert together.dtype == newton_schulz_dtype(matrix.device)  # not cast back: the step adds it as it is
        torch.testing.assert_close(together.float(), orthogonalize(matrix), atol=tolerance, rtol=tolerance)


def test_hidden_matrices_take_orthogonalised_momentum_and_the_rest_takes_adamw() -> None:
    model = model_with_gradients()
    reference = copy.deepcopy(model)
    set_gradients(reference, 0)  # a deep copy leaves the gradients behind
    optimizer = MuonWithAdamW(
        param_groups(model), lr=0.02, momentum=0.9, nesterov=True, adamw_lr=0.003, weight_decay=0.1
    )
    hidden, token_maps, gains = param_groups(reference)
    adamw = torch.optim.AdamW([token_maps, gains], lr=0.003, betas=(0.9, 0.95), weight_decay=0.1)
    buffers = [torch.zeros_like(param) for param in hidden["params"]]
    for step in range(2):  # the second step also exercises the momentum buffer and AdamW's moments
        if step:
            set_gradients(model, step)
            set_gradients(reference, step)
        optimizer.step()
        adamw.step()
        for param, buffer in zip(hidden["params"], buffers, strict=True):
            buffer.mul_(0.9).add_(param.grad)
            direction = param.grad + 0.9 * buffer  # Nesterov
            scale = 0.02 * math.sqrt(max(1.0, param.size(0) / param.size(1)))
            param.data = param.data * (1 - 0.02 * 0.1) - scale * orthogonalize(direction)
    for (name, mine), theirs in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, msg=name)


def test_a_flagged_step_leaves_weights_and_state_alone_and_state_round_trips() -> None:
    model = model_with_gradients()
    optimizer = MuonWithAdamW(param_groups(model), fused=True)  # AdamW takes found_inf only fused
    optimizer.step()
    before = copy.deepcopy((list(model.parameters()), optimizer.state_dict()))
    set_gradients(model, 5)
    optimizer.found_inf = torch.tensor(1.0)  # as the step guard sets it
    optimizer.step()
    for mine, saved in zip(model.parameters(), before[0], strict=True):
        torch.testing.assert_close(mine, saved, rtol=0, atol=0)
    torch.testing.assert_close(optimizer.state_dict()["state"], before[1]["state"], rtol=0, atol=0)

    # Saved and loaded into a fresh optimizer (with other LRs, as a schedule would reset), the run continues alike.
    optimizer.found_inf = None
    resumed_model = copy.deepcopy(model)
    resumed = MuonWithAdamW(param_groups(resumed_model), lr=0.5, adamw_lr=0.5, fused=True)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as from a file: no shared tensors
    assert [g["lr"] for g in resumed.param_groups] == [g["lr"] for g in optimizer.param_groups]
    set_gradients(model, 6)
    set_gradients(resumed_model, 6)
    optimizer.step()
    resumed.step()
    for mine, theirs in zip(model.parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_a_schedule_scales_both_learning_rates() -> None:
    optimizer = MuonWithAdamW(param_groups(model_with_gradients()), lr=0.02, adamw_lr=0.004)
    scheduler = WarmupCosineLR(optimizer, warmup_steps=4, max_steps=10)
    optimizer.step()
    scheduler.step()
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.01, 0.002, 0.002])
    assert optimizer._adamw.param_groups[0]["lr"] == pytest.approx(0.002)  # AdamW reads the same groups


def test_flat_shards_and_unmarked_groups_are_refused_with_the_way_out() -> None:
    flat = [{"params": [torch.zeros(12, requires_grad=True)], "hidden_matrices": True}]
    with pytest.raises(UserError, match=r"FSDP1.*FSDP2"):
        MuonWithAdamW(flat)
    with pytest.raises(UserError, match="param_groups"):
        MuonWithAdamW([torch.zeros(3, 3, requires_grad=True)])


def test_another_optimizer_s_state_is_refused_with_the_way_out() -> None:
    model = model_with_gradients()
    adamw = torch.optim.AdamW(param_groups(model))
    adamw.step()
    with pytest.raises(UserError, match="init_from"):
        MuonWithAdamW(param_groups(model)).load_state_dict(adamw.state_dict())
