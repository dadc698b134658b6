"""``model.compile``: ``auto`` compiles where the machine can, ``true`` requires it, ``false`` never compiles."""

from __future__ import annotations

import pytest
import torch
import torch._inductor.cpp_builder as cpp_builder
from torch._inductor.exc import InvalidCxxCompiler

from pretrain.errors import UserError
from pretrain.model.losses import next_token_loss
from pretrain.train.compile_check import compiles, missing_compiler
from pretrain.train.module import PretrainModule
from tests.helpers.runs import TINY_VOCAB

CPU = torch.device("cpu")


def without_a_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    def search() -> str:
        raise InvalidCxxCompiler

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", search)


def test_a_cpu_without_a_cxx_compiler_runs_auto_eagerly_and_refuses_true(monkeypatch: pytest.MonkeyPatch) -> None:
    without_a_compiler(monkeypatch)
    assert "C++ compiler" in missing_compiler(CPU)
    assert compiles("auto", CPU) is False
    assert compiles(False, CPU) is False
    with pytest.raises(UserError, match=r"model\.compile: true needs a C\+\+ compiler.*model\.compile: auto"):
        compiles(True, CPU)
    assert missing_compiler(torch.device("cuda")) is None  # GPUs compile with Triton, no C++ compiler asked


def test_with_a_compiler_auto_and_true_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", lambda: "g++")
    assert missing_compiler(CPU) is None
    assert compiles("auto", CPU) is True
    assert compiles(True, CPU) is True


@pytest.mark.parametrize("has_compiler", [False, True])
def test_the_module_compiles_on_auto_only_where_it_can(has_compiler: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if has_compiler:
        monkeypatch.setattr(cpp_builder, "get_cpp_compiler", lambda: "g++")
    else:
        without_a_compiler(monkeypatch)
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compiled.append(fn) or fn)
    overrides = {"d_model": 32, "n_layer": 1, "n_head": 2, "n_kv_head": 2, "ffn_dim": 64}
    module = PretrainModule(overrides=overrides, vocab_size=TINY_VOCAB, seq_len=16, compile="auto")
    module.configure_model()
    assert (next_token_loss in compiled) is has_compiler
