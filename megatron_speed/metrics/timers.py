"""Wall-clock time per named phase of the loop (generate, score, train, sync, ...).

`with timer("generate"): ...` adds the block's elapsed seconds to that phase; `pop()` hands the
totals to the logger as `{"time/generate": seconds, ...}` and starts afresh. Phases may nest or
repeat within a step; each accumulates independently.

On a GPU every phase boundary synchronises the device (`synchronize`, default
`torch.cuda.synchronize` when CUDA is present): kernels are queued asynchronously, so without it the
work a phase enqueued is charged to whichever later phase first waits for it (a train step's
backward to the refit). Deliberately left out: cross-rank reduction.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def _device_synchronize() -> Callable[[], None] | None:
    import torch

    return torch.cuda.synchronize if torch.cuda.is_available() else None


class PhaseTimer:
    """Accumulates wall seconds per phase name until `pop()`."""

    def __init__(self, prefix: str = "time/", synchronize: Callable[[], None] | None = None) -> None:
        self.prefix = prefix
        self._totals: dict[str, float] = {}
        self._sync = synchronize if synchronize is not None else _device_synchronize()

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        """Time the `with` block and add it to `phase`, also when the block raises; the device is
        synchronised before the clock starts and before it stops."""
        if self._sync is not None:
            self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._sync is not None:
                self._sync()
            self._totals[phase] = self._totals.get(phase, 0.0) + time.perf_counter() - start

    def peek(self) -> dict[str, float]:
        """The totals so far, keyed `prefix + phase`, without resetting them."""
        return {self.prefix + phase: seconds for phase, seconds in self._totals.items()}

    def pop(self) -> dict[str, float]:
        """The totals so far, keyed `prefix + phase`; resets every phase to zero."""
        out = self.peek()
        self._totals.clear()
        return out


__all__ = ["PhaseTimer"]
