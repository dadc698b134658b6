"""CPU runs keep freed host memory for the next step instead of faulting fresh pages in each time."""

from __future__ import annotations

import ctypes
import resource
import sys
from pathlib import Path

import pytest
import torch

from pretrain.host_memory import M_MMAP_MAX, M_TRIM_THRESHOLD, keep_freed_memory
from tests.helpers import tiny_fit_args

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallopt"), reason="glibc's mallopt"
)
M_MMAP_THRESHOLD = -3


def restore_glibc_defaults() -> None:
    """glibc's starting settings (held fixed: glibc stops raising its thresholds once they are set)."""
    mallopt = ctypes.CDLL(None).mallopt
    assert mallopt(M_MMAP_MAX, 65536) and mallopt(M_TRIM_THRESHOLD, 128 << 10) and mallopt(M_MMAP_THRESHOLD, 128 << 10)


def faults_per_step() -> float:
    """Page faults per step of a small training-like loop (blocks of 1-4 MB), once it has run ten."""
    weight = torch.randn(1024, 1024, requires_grad=True)
    inputs = torch.randn(256, 1024)

    def step() -> None:
        ((inputs @ weight).relu() @ weight).sum().backward()
        weight.grad = None

    for _ in range(10):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20


def test_freed_memory_is_reused_without_page_faults() -> None:
    restore_glibc_defaults()
    assert faults_per_step() > 3000  # 3,849: every 4 KiB page of each block fresh from the kernel, each step
    assert keep_freed_memory()
    assert faults_per_step() < 400


def test_a_cpu_run_keeps_freed_memory(corpus, prepared: Path, tmp_path: Path, run_cli) -> None:
    restore_glibc_defaults()
    result = run_cli(*tiny_fit_args(corpus[0], prepared, tmp_path, "--trainer.max_steps", "1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert faults_per_step() < 400
