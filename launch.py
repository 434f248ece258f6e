#!/usr/bin/env python3
"""Launch a recipe: `python launch.py RECIPE [key.sub=value ...] [--executor local|docker|slurm] [--dryrun]`.

Without an executor the job runs in this process; with one, nemo-run runs it under torchrun.
Details and every flag: megatron_speed/launch/cli.py, `python launch.py --help`, examples/README.md.
"""

from __future__ import annotations

import sys

from megatron_speed.launch.cli import main

if __name__ == "__main__":
    sys.exit(main())
