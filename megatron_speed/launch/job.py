"""The job entry every executor runs: `python -m megatron_speed.launch.job RECIPE [key.sub=value ...]`.

It takes only a recipe name and dotted overrides, so a job is reproduced from its command line alone
(anything a YAML file said arrives flattened into overrides). Under torchrun each rank runs this same
module; the parallel layout comes from the environment torchrun sets.
"""

from __future__ import annotations

import sys

from megatron_speed.config import ConfigError
from megatron_speed.recipes import load_recipe


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print("usage: python -m megatron_speed.launch.job RECIPE [key.sub=value ...]", file=sys.stderr)
        return 2
    from megatron_speed.preflight import check_paths

    try:
        cfg = load_recipe(argv[0], argv[1:])
        check_paths(cfg)  # missing model folders and prompt files stop every rank here, before torch.distributed
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from megatron_speed.main import exit_status, run

    return exit_status(run(cfg))


if __name__ == "__main__":  # the guard also keeps dist-checkpointing's spawned writer from re-running the job
    sys.exit(main(sys.argv[1:]))
