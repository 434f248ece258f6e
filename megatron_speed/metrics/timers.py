"""Wall-clock time per named phase of the loop (generate, score, train, sync, ...).

`with timer("generate"): ...` adds the block's elapsed seconds to that phase; `pop()` hands the
totals to the logger as `{"time/generate": seconds, ...}` and starts afresh. Phases may nest or
repeat within a step; each accumulates independently. Deliberately left out: CUDA synchronisation
(the caller synchronises where a phase ends on the device) and cross-rank reduction.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class PhaseTimer:
    """Accumulates wall seconds per phase name until `pop()`."""

    def __init__(self, prefix: str = "time/") -> None:
        self.prefix = prefix
        self._totals: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        """Time the `with` block and add it to `phase`, also when the block raises."""
        start = time.perf_counter()
        try:
            yield
        finally:
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
