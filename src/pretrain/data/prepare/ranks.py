"""The processes that build one set of shards together: this one alone, or the group torchrun started.

``torchrun --nnodes N --nproc-per-node P -m pretrain.commands.prepare ...`` gives every process its rank through
the environment; the group talks over gloo (CPU only), so preparation runs on nodes without a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch.distributed as dist

from pretrain.errors import UserError

T = TypeVar("T")
# How long a process waits for the others at a step boundary. Ranks encode shares of about the same size,
# so this only matters when one is lost; torchrun ends the whole group when one of its processes dies.
STEP_TIMEOUT = timedelta(hours=6)


class Ranks:
    """Rank, world size and the few collective steps a build needs. World size 1 needs no group at all."""

    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        self.rank, self.world_size = rank, world_size

    @classmethod
    def from_launcher(cls) -> Ranks:
        """The torchrun group this process belongs to (joined here), or this process alone."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=STEP_TIMEOUT)
        return cls(dist.get_rank(), dist.get_world_size())

    def __enter__(self) -> Ranks:
        return self

    def __exit__(self, kind: type | None, *_: object) -> None:
        """Leave the group: after every rank is done (a rank leaving first would abort the others' last step),
        or at once after a failure, which the others have been told of."""
        if self.world_size > 1 and dist.is_initialized():
            if kind is None:
                dist.barrier()
            dist.destroy_process_group()

    @property
    def first(self) -> bool:
        return self.rank == 0

    def everywhere(self, step: Callable[[], T]) -> T:
        """Run ``step`` on every rank; if it failed on any, raise on all (nobody is left waiting)."""
        try:
            result, error = step(), None
        except Exception as raised:  # re-raised below, on this rank and the others
            result, error = None, raised
        errors = self.gather(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = next((rank for rank, found in enumerate(errors) if found is not None), None)
        if failed is not None:
            raise UserError(f"Preparation failed on rank {failed}: {errors[failed]}")
        return result

    def on_first(self, step: Callable[[], T]) -> T:
        """Run ``step`` on rank 0 alone and give every rank its result (or its error)."""
        result = self.everywhere(lambda: step() if self.first else None)
        if self.world_size == 1:
            return result
        box = [result]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """``value`` from every rank, in rank order."""
        if self.world_size == 1:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values
