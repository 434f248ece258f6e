#!/usr/bin/env python3
"""Launch a recipe: `python launch.py RECIPE [key.sub=value ...] [--config FILE.yaml] [--dryrun]`.

The recipe name and dotted overrides are the only job arguments; everything else is config. The
job runs in this process (a world of one, or one rank under torchrun). `--dryrun` prints the
resolved config and exits.
"""

from __future__ import annotations

import argparse
import sys

import yaml


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="recipe name, e.g. toy_cpu")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.n=8 run.steps=20")
    parser.add_argument("--config", default=None, help="YAML file applied after the recipe, before overrides")
    parser.add_argument("--dryrun", action="store_true", help="print the resolved config and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from megatron_speed.config import ConfigError, load_config, to_dict

    try:
        cfg = load_config(args.recipe, args.overrides, args.config)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.dryrun:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    from megatron_speed.main import run

    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
