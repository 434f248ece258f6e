"""Memory arithmetic of a colocated run: the plan per GPU and phase (`plan`), and the engine's share of
what the actor leaves free on a GPU (`runtime`, imported where it is used)."""

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
