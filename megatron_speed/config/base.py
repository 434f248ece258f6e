"""The machinery every config section shares: type checks and errors that say how to fix them.

A section is a frozen, kw-only dataclass deriving from `Section`. Construction checks each field's
type against its annotation and then runs the section's own `check()`; nothing mutates a section
afterwards (derived values are properties). Errors carry the dotted key so that a problem deep in
the tree reads `rollout.n (1) must be >= 2 for a grouped baseline: set rollout.n=2 or more`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A config value is wrong. `key` is the dotted path; the message names value, rule and fix."""

    def __init__(self, key: str, value: Any, rule: str, fix: str) -> None:
        self.key, self.value, self.rule, self.fix = key, value, rule, fix
        super().__init__(f"{key} ({value!r}) {rule}: {fix}")

    def with_prefix(self, prefix: str) -> ConfigError:
        return ConfigError(f"{prefix}.{self.key}" if prefix else self.key, self.value, self.rule, self.fix)


def require(ok: bool, key: str, value: Any, rule: str, fix: str) -> None:
    if not ok:
        raise ConfigError(key, value, rule, fix)


def describe_type(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(describe_type(a) for a in get_args(tp))
    if origin is tuple:
        return f"a list of {describe_type(get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def matches(value: Any, tp: Any) -> bool:
    """True when `value` is an instance of the annotation `tp` (the subset configs use)."""
    origin = get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in get_args(tp)
    if origin in (Union, types.UnionType):
        return any(matches(value, a) for a in get_args(tp))
    if origin is tuple:
        args = get_args(tp)
        return isinstance(value, tuple) and all(matches(v, args[0]) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is type(None):
        return value is None
    return isinstance(value, tp)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Section:
    """Base of every config section: typed, frozen, validated on construction."""

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            tp = hints[f.name]
            if isinstance(value, list) and get_origin(tp) is tuple:
                value = tuple(value)
                object.__setattr__(self, f.name, value)
            if isinstance(value, int) and not isinstance(value, bool) and tp is float:
                object.__setattr__(self, f.name, float(value))
            require(matches(value, tp), f.name, value, f"must be {describe_type(tp)}",
                    f"give {f.name} a value of that type")
        self.check()

    def check(self) -> None:
        """Section-specific rules; raise ConfigError (via `require`) naming the field."""


def section_fields(tp: type) -> dict[str, Any]:
    return get_type_hints(tp)


def is_section(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Section)


def to_dict(section: Section) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if isinstance(value, Section):
            out[f.name] = to_dict(value)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        else:
            out[f.name] = value
    return out


__all__ = ["ConfigError", "Section", "describe_type", "matches", "require", "to_dict", "typing"]
