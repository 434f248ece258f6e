"""Recipes: functions that return a `Config`. Variants call a base recipe and change a few fields.

`get_recipe(name)` looks a recipe up by name; `launch.py` takes that name plus dotted overrides.
"""

from __future__ import annotations

from collections.abc import Callable

from megatron_speed.config.base import ConfigError
from megatron_speed.config.schema import Config
from megatron_speed.recipes.papers import PAPER_RECIPES
from megatron_speed.recipes.toy import TOY_RECIPES, toy_cpu

RECIPES: dict[str, Callable[[], Config]] = {**TOY_RECIPES, **PAPER_RECIPES}


def get_recipe(name: str) -> Callable[[], Config]:
    if name not in RECIPES:
        raise ConfigError("recipe", name, "is not a known recipe", f"pick one of: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


__all__ = ["RECIPES", "get_recipe", "toy_cpu"]
