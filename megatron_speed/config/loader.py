"""Build a `Config` from a recipe, an optional YAML file and dotted command-line overrides.

Order: recipe function -> YAML (nested mapping) -> `key.sub=value` overrides, later wins. Values
from the command line are parsed as YAML scalars/lists (`rollout.n=8`, `data.train_files=[a,b]`,
`data.toy=null`). Unknown keys and wrong types are errors naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from megatron_speed.config.base import ConfigError, Section, is_section, section_fields
from megatron_speed.config.schema import Config


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-6` / `3E5` as floats (YAML 1.1 needs a dot: `1.0e-6`)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _unknown(prefix: str, key: str, section: type) -> ConfigError:
    names = list(section_fields(section))
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"did you mean {prefix}{close[0]}?" if close else f"known keys: {', '.join(names)}"
    return ConfigError(prefix + key, key, "is not a config key", hint)


def _section_type(tp: Any) -> type | None:
    """The Section class inside an annotation such as `ToyTaskConfig | None`."""
    if is_section(tp):
        return tp
    for arg in getattr(tp, "__args__", ()) or ():
        if is_section(arg):
            return arg
    return None


def merge(section: Section | None, updates: dict[str, Any], tp: type, prefix: str = "") -> Section:
    """Return `section` (or a default `tp`) with nested `updates` applied, validated."""
    current = section if section is not None else tp()
    hints = section_fields(tp)
    changes: dict[str, Any] = {}
    for key, value in updates.items():
        if key not in hints:
            raise _unknown(prefix, key, tp)
        sub = _section_type(hints[key])
        if sub is not None and isinstance(value, dict):
            changes[key] = merge(getattr(current, key), value, sub, f"{prefix}{key}.")
        else:
            changes[key] = value
    try:
        return dataclasses.replace(current, **changes)
    except ConfigError as err:
        raise err.with_prefix(prefix.rstrip(".")) from None


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["rollout.n=8", "data.toy.seed=3"]` -> nested dict; values parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, item, "is not of the form key=value", "write e.g. rollout.n=8")
        key, raw = item.split("=", 1)
        value = yaml.load(raw, Loader=_YamlLoader) if raw.strip() else ""
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, raw, "sets a value below a plain value", "check the dotted path")
        node[parts[-1]] = value
    return tree


def load_config(recipe: Config | Callable[[], Config], overrides: list[str] | None = None,
                yaml_path: str | Path | None = None) -> Config:
    """The only way a run's config is made: recipe, then YAML, then overrides; validated.

    `recipe` is a config or a recipe function; a recipe *name* is resolved one floor up, by
    `megatron_speed.recipes.load_recipe`, so this package imports nothing above it."""
    config = recipe if isinstance(recipe, Config) else recipe()
    if yaml_path is not None:
        data = yaml.load(Path(yaml_path).read_text(), Loader=_YamlLoader) or {}
        if not isinstance(data, dict):
            raise ConfigError(str(yaml_path), type(data).__name__, "must hold a mapping",
                              "write the YAML as nested keys, e.g. rollout: {n: 8}")
        config = merge(config, data, Config)
    if overrides:
        config = merge(config, parse_overrides(overrides), Config)
    assert isinstance(config, Config)
    return config
