"""Memory arithmetic of a colocated run: the plan per GPU and phase, and the engine's share at runtime."""

from megatron_speed.memory.plan import (
    GIB,
    KNOWN_SHAPES,
    RUNTIME_RESERVE,
    EngineMemory,
    ModelShape,
    Plan,
    PlanInputs,
    engine_memory,
    plan,
    suggest,
)

__all__ = ["GIB", "KNOWN_SHAPES", "RUNTIME_RESERVE", "EngineMemory", "ModelShape", "Plan", "PlanInputs",
           "engine_memory", "plan", "suggest"]
