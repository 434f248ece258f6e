"""Misbehaving graders for the reward-pool tests, importable as "tests.unit.graders_for_tests:NAME"."""

from __future__ import annotations

import os
import time
from pathlib import Path

NOT_CALLABLE = 42


def hang(response: str, answer: str) -> float:
    """Never returns in any test's lifetime."""
    time.sleep(600)
    return 1.0


def boom(response: str, answer: str) -> float:
    """Always raises."""
    raise ArithmeticError(f"cannot grade {response!r}")


def crash(response: str, answer: str) -> float:
    """Kills its own process without unwinding, as a segfault in a native library would."""
    os._exit(3)


def meet(mine: str, theirs: str, patience: float = 5.0) -> float:
    """Create file `mine`, then wait for file `theirs`: 1.0 if it appears, so both ran at once."""
    Path(mine).touch()
    give_up = time.monotonic() + patience
    while time.monotonic() < give_up:
        if Path(theirs).exists():
            return 1.0
        time.sleep(0.01)
    return 0.0


def scripted(response: str, answer: str) -> float:
    """Behaves as the response says: "hang", "boom", "crash", "meet:MINE:THEIRS", else
    1.0 for an exact match with the answer."""
    if response == "hang":
        return hang(response, answer)
    if response == "boom":
        return boom(response, answer)
    if response == "crash":
        return crash(response, answer)
    if response.startswith("meet:"):
        _, mine, theirs = response.split(":")
        return meet(mine, theirs)
    return float(response == answer)
