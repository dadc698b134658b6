"""CPU runs keep freed host memory for the next step instead of faulting fresh pages in each time."""

from __future__ import annotations

import ctypes
import resource
import sys
from pathlib import Path

import pytest
import torch

from pretrain.train.host_memory import M_MMAP_MAX, M_TRIM_THRESHOLD, keep_freed_memory
from tests.helpers.runs import assert_ok, tiny_fit_args

LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None  # the C library this process runs on
pytestmark = pytest.mark.skipif(not hasattr(LIBC, "mallinfo2"), reason="glibc 2.33+")
M_MMAP_THRESHOLD = -3


class MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2``."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def mapped_bytes() -> int:
    """Bytes in blocks that glibc made mappings of their own (and unmaps when they are freed)."""
    LIBC.mallinfo2.restype = MallInfo2
    return LIBC.mallinfo2().hblkhd


def restore_glibc_defaults() -> None:
    """glibc's starting settings (held fixed: glibc stops raising its thresholds once they are set)."""
    mallopt = LIBC.mallopt
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


def large_block_bytes() -> int:
    """48 MiB (above any threshold glibc sets itself), or more than the heap holds free: glibc serves a block from
    a free chunk of the heap that fits before it considers a mapping, and earlier tests leave some behind."""
    LIBC.mallinfo2.restype = MallInfo2
    return max(48 << 20, LIBC.mallinfo2().fordblks + (1 << 20))


def test_large_blocks_come_from_the_heap_and_steps_reuse_them() -> None:
    restore_glibc_defaults()
    size = large_block_bytes()
    before = mapped_bytes()
    block = torch.empty(size, dtype=torch.uint8)
    assert mapped_bytes() - before >= size  # a mapping of its own, handed back when freed
    del block
    assert keep_freed_memory()
    before = mapped_bytes()
    block = torch.empty(size, dtype=torch.uint8)
    assert mapped_bytes() == before
    del block
    assert faults_per_step() < 400  # 2,800-3,900 with glibc's settings: each block's pages fresh, each step


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_a_cpu_run_keeps_freed_memory(corpus, prepared: Path, tmp_path: Path, run_cli, command: str) -> None:
    """Training, and scoring held-out text alone (``pretrain validate``: 65 against 90-92 ms per quickstart batch)."""
    restore_glibc_defaults()
    result = run_cli(command, *tiny_fit_args(corpus[0], prepared, tmp_path, "--trainer.max_steps", "1")[1:])
    assert_ok(result)
    assert faults_per_step() < 400
