import itertools
import logging
from pathlib import Path

import pytest
import torch
from torch.optim.lr_scheduler import LRScheduler

from pretrain.errors import UserError
from pretrain.model.config import LlamaConfig
from pretrain.model.llama import Llama
from pretrain.train.param_groups import param_groups
from pretrain.train.schedules import DECAY_SHAPES, WarmupCosineLR, WarmupStableDecayLR
from tests.helpers.runs import assert_ok, scalars_by_step, tiny_fit_args


def test_weight_decay_applies_to_matrices_only_and_hidden_matrices_are_marked() -> None:
    model = Llama(LlamaConfig(vocab_size=64, seq_len=8, d_model=16, n_layer=2, n_head=2, n_kv_head=2, ffn_dim=32))
    hidden, token_maps, exempt = param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert hidden["hidden_matrices"] and not token_maps.get("hidden_matrices")
    assert sorted(names[id(p)] for p in token_maps["params"]) == ["embed.weight", "lm_head.weight"]
    assert all(names[id(p)].startswith("blocks.") and p.dim() == 2 for p in hidden["params"])
    assert exempt["weight_decay"] == 0.0 and "weight_decay" not in hidden and "weight_decay" not in token_maps
    assert {id(p) for p in exempt["params"]} == {id(p) for n, p in model.named_parameters() if "norm" in n}
    assert sum(len(group["params"]) for group in (hidden, token_maps, exempt)) == len(list(model.parameters()))


def advance(optimizer: torch.optim.Optimizer, scheduler: WarmupCosineLR, steps: int) -> list[float]:
    """The LR of each of ``steps`` optimizer steps."""
    values = []
    for _ in range(steps):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


def lrs(warmup: int, max_steps: int, min_ratio: float, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = WarmupCosineLR(optimizer, warmup_steps=warmup, max_steps=max_steps, min_lr_ratio=min_ratio)
    return advance(optimizer, scheduler, steps)


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
    assert caplog.messages == [
        "warmup_steps=20 is longer than max_steps=10: warming up for 1 steps (a tenth of the run) instead."
    ]
    assert values[0] == pytest.approx(1.0) and values[-1] < values[1]  # warmed up in one step, then decays


def scheduled(max_steps: int, lr: float = 1.0) -> tuple[torch.optim.Optimizer, WarmupCosineLR]:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    return optimizer, WarmupCosineLR(optimizer, warmup_steps=4, max_steps=max_steps, min_lr_ratio=0.1)


def resumed(saved: tuple[torch.optim.Optimizer, WarmupCosineLR], max_steps: int, lr: float = 1.0, state=None):
    """A new optimizer and schedule built from (possibly other) settings, loaded as Lightning loads them:
    the optimizer's state first (its LRs are the saved run's), then the schedule's."""
    optimizer, scheduler = scheduled(max_steps, lr)
    optimizer.load_state_dict(saved[0].state_dict())
    scheduler.load_state_dict(state if state is not None else saved[1].state_dict())
    return optimizer, scheduler


def test_a_resumed_schedule_keeps_its_position_and_takes_the_runs_settings() -> None:
    first = scheduled(20)
    before = advance(*first, 10)
    assert set(first[1].state_dict()) == {"last_epoch", "_step_count"}  # no settings, no peak LRs
    # The same settings: the uninterrupted run's LRs, exactly.
    assert before + advance(*resumed(first, 20), 10) == lrs(warmup=4, max_steps=20, min_ratio=0.1, steps=20)
    # A longer run: the decay stretched from step 10 on, as if the run had been planned that long.
    assert advance(*resumed(first, 40), 30) == lrs(warmup=4, max_steps=40, min_ratio=0.1, steps=40)[10:]
    # A new peak LR applies from the first resumed step.
    assert advance(*resumed(first, 20, lr=0.5), 10) == pytest.approx(
        [0.5 * lr for lr in lrs(warmup=4, max_steps=20, min_ratio=0.1, steps=20)[10:]]
    )
    # A checkpoint written with PyTorch's full scheduler state (settings included) resumes the same way.
    full = LRScheduler.state_dict(first[1])
    assert full["max_steps"] == 20 and full["base_lrs"] == [1.0]
    assert advance(*resumed(first, 40, state=full), 30) == lrs(warmup=4, max_steps=40, min_ratio=0.1, steps=40)[10:]


def wsd_lrs(max_steps: int, shape: str, steps: int, warmup: int = 2, fraction: float = 0.25) -> list[float]:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = WarmupStableDecayLR(optimizer, warmup, max_steps, decay_fraction=fraction, decay_shape=shape)
    return advance(optimizer, scheduler, steps)


@pytest.mark.parametrize(("shape", "middle"), [("linear", 0.5), ("cosine", 0.5), ("sqrt", 1 - 0.5**0.5)])
def test_warmup_stable_decay_holds_the_peak_then_decays_over_its_last_fraction(shape: str, middle: float) -> None:
    values = wsd_lrs(max_steps=20, shape=shape, steps=22)
    assert values[:2] == [0.5, 1.0] and values[2:16] == [1.0] * 14  # warmup, then stable; the decay starts at 15
    assert values[17] == pytest.approx(DECAY_SHAPES[shape](2 / 5))  # two fifths into the decay
    assert DECAY_SHAPES[shape](0.5) == pytest.approx(middle)
    assert all(a > b for a, b in itertools.pairwise(values[15:20])) and values[20:] == [0.0, 0.0]


def test_a_stable_phase_checkpoint_anneals_at_another_budget() -> None:
    """The same stable phase, decayed over the last quarter of 20 steps or of 40."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = WarmupStableDecayLR(optimizer, 2, 20, decay_fraction=0.25)
    before = advance(optimizer, scheduler, 10)
    longer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    longer.load_state_dict(optimizer.state_dict())
    stretched = WarmupStableDecayLR(longer, 2, 40, decay_fraction=0.25)
    stretched.load_state_dict(scheduler.state_dict())
    assert before + advance(longer, stretched, 30) == wsd_lrs(max_steps=40, shape="linear", steps=40)


def test_warmup_stable_decay_refuses_a_bad_fraction_or_shape() -> None:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(UserError, match=r"decay_fraction=1\.5 must be between 0 and 1"):
        WarmupStableDecayLR(optimizer, 2, 20, decay_fraction=1.5)
    with pytest.raises(UserError, match="choose one of linear, cosine, sqrt"):
        WarmupStableDecayLR(optimizer, 2, 20, decay_shape="step")


def test_warmup_stable_decay_from_the_command_line(corpus, prepared: Path, tmp_path: Path, run_cli) -> None:
    init = "--model.lr_scheduler.init_args"
    schedule = (
        "--model.lr_scheduler",
        "pretrain.train.WarmupStableDecayLR",
        f"{init}.warmup_steps",
        "2",
        f"{init}.decay_shape",
        "sqrt",
        f"{init}.min_lr_ratio",
        "0.05",
        f"{init}.decay_fraction",
        "0.2",
    )
    result = run_cli(*tiny_fit_args(corpus[0], prepared, tmp_path, *schedule, "--trainer.max_steps", "10"))
    assert_ok(result)
    logged = scalars_by_step(tmp_path / "quickstart" / "version_0", "train/lr")
    expected = WarmupStableDecayLR(
        torch.optim.SGD([torch.zeros(1)], lr=0.02), 2, 10, decay_shape="sqrt", min_lr_ratio=0.05
    )
    peak = 0.02  # train/lr is the first group's: the quickstart's Muon rate
    assert [logged[step] for step in range(10)] == pytest.approx([peak * expected.lr_factor(s) for s in range(10)])
