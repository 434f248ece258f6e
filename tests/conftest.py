"""Fixtures every test folder shares."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest


@pytest.fixture
def closing() -> Iterator[Callable[[Any], Any]]:
    """`engine = closing(VLLMEngine(...))`: closed when the test ends, passed or failed. An engine left
    open keeps vLLM's process groups set up, and the next engine of another shape would find them."""
    made: list[Any] = []

    def keep(engine: Any) -> Any:
        made.append(engine)
        return engine

    yield keep
    for engine in reversed(made):
        engine.close()


GPU_RESOLUTION_TEST = "tests/unit/test_packaging.py::test_gpu_install_set_resolves_for_the_gpu_host"


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the GPU install set's pip resolution as soon as the test is known to run: it waits on the
    package index for minutes with little CPU, so it overlaps the CPU-bound tests instead of adding to them."""
    if any(item.nodeid == GPU_RESOLUTION_TEST for item in session.items):
        from tests.unit.test_packaging import GPU_RESOLUTION, GPU_SET, Resolution

        session.config.stash[GPU_RESOLUTION] = Resolution(GPU_SET)


def pytest_sessionfinish(session: pytest.Session) -> None:
    from tests.unit.test_packaging import GPU_RESOLUTION

    started = session.config.stash.get(GPU_RESOLUTION, None)
    if started is not None:
        started.close()  # not consumed (the run stopped early): stop pip
