import itertools
import logging

import pytest
import torch

from pretrain.errors import UserError
from pretrain.model import Llama, LlamaConfig
from pretrain.optim import WarmupCosineLR, param_groups


def test_weight_decay_applies_to_matrices_only() -> None:
    model = Llama(LlamaConfig(vocab_size=64, seq_len=8, d_model=16, n_layer=2, n_head=2, n_kv_head=2, ffn_dim=32))
    decayed, exempt = param_groups(model)
    assert all(p.dim() == 2 for p in decayed["params"])
    assert exempt["weight_decay"] == 0.0
    assert {id(p) for p in exempt["params"]} == {id(p) for n, p in model.named_parameters() if "norm" in n}
    assert len(decayed["params"]) + len(exempt["params"]) == len(list(model.parameters()))


def lrs(warmup: int, max_steps: int, min_ratio: float, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = WarmupCosineLR(optimizer, warmup_steps=warmup, max_steps=max_steps, min_lr_ratio=min_ratio)
    values = []
    for _ in range(steps):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


def test_schedule_warms_up_linearly_then_decays_to_the_floor() -> None:
    values = lrs(warmup=4, max_steps=20, min_ratio=0.1, steps=25)
    assert values[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in itertools.pairwise(values[3:]))
    assert values[12] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert values[20:] == pytest.approx([0.1] * 5)


def test_schedule_without_max_steps_says_what_to_set() -> None:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(UserError, match=r"set trainer\.max_steps"):
        WarmupCosineLR(optimizer, warmup_steps=2, max_steps=-1)


def test_a_warmup_longer_than_the_run_fits_itself_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        values = lrs(warmup=20, max_steps=10, min_ratio=0.1, steps=10)
    assert caplog.messages == ["warmup_steps=20 is longer than max_steps=10: warming up for 1 steps (a tenth of the "
                               "run) instead."]  # fmt: skip
    assert values[0] == pytest.approx(1.0) and values[-1] < values[1]  # warmed up in one step, then decays
