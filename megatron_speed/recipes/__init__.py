"""Recipes: functions that return a `Config`. Variants call a base recipe and change a few fields.

`get_recipe(name)` looks a recipe up by name; `load_recipe(name, overrides)` builds the run's
validated config from it (what `launch.py` does with a recipe name plus dotted overrides).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from megatron_speed.config.base import ConfigError
from megatron_speed.config.loader import load_config
from megatron_speed.config.schema import Config
from megatron_speed.recipes.papers import PAPER_RECIPES
from megatron_speed.recipes.toy import TOY_RECIPES, toy_cpu

RECIPES: dict[str, Callable[[], Config]] = {**TOY_RECIPES, **PAPER_RECIPES}


def get_recipe(name: str) -> Callable[[], Config]:
    if name not in RECIPES:
        raise ConfigError("recipe", name, "is not a known recipe", f"pick one of: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


def load_recipe(recipe: str | Config, overrides: list[str] | None = None,
                yaml_path: str | Path | None = None) -> Config:
    """`load_config` for a recipe given by name (or an already built config)."""
    return load_config(get_recipe(recipe) if isinstance(recipe, str) else recipe, overrides, yaml_path)


__all__ = ["RECIPES", "get_recipe", "load_recipe", "toy_cpu"]
