"""Typed config tree: sections in `schema`, loading (recipe -> YAML -> dotted overrides) in `loader`."""

from megatron_speed.config.base import ConfigError, Section, to_dict
from megatron_speed.config.loader import load_config, merge, parse_overrides
from megatron_speed.config.schema import Config

__all__ = ["Config", "ConfigError", "Section", "load_config", "merge", "parse_overrides", "to_dict"]
