"""A training loader that discards its first micro-batches: how a run rolled back past a loss spike skips the
batches that caused it (``data.skip_batches``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


class SkippingLoader:
    """``loader``, whose first iterator (after a resume: from the restored position) first draws and drops
    ``batches`` micro-batches (continuing into the next epoch if this one ends first).

    The dropped batches count as consumed in the loader's state, so a checkpoint of the rolled-back run
    resumes it exactly; everything else (length, state, attributes) is the loader's.
    """

    def __init__(self, loader: Any, batches: int) -> None:
        self.loader = loader
        self.remaining = batches

    def __iter__(self) -> Iterator[Any]:
        """A generator: nothing is drawn until the first batch is asked for (Lightning makes and drops an iterator
        to check that the loader is iterable)."""
        iterator = iter(self.loader)
        while self.remaining > 0:
            if next(iterator, None) is None:  # the epoch ends first: the next one skips the rest
                return
            self.remaining -= 1
        yield from iterator

    def __len__(self) -> int:
        return len(self.loader)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)

    def __getattr__(self, name: str) -> Any:  # only for names not found on the wrapper itself
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)
