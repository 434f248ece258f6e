"""What both converter CLIs share: the process group for a tp x pp layout, and error reporting."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


def run_in_layout(tool: str, tp: int, pp: int, work: Callable[[], object]) -> int:
    """Initialise a world of exactly tp * pp processes (torchrun, or this process when 1), run `work`,
    tear down. Known problems (bad layout, unsupported model, missing checkpoint) print one line."""
    from megatron_speed.config.schema import ParallelConfig
    from megatron_speed.parallel import destroy_parallel, init_parallel

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp < 1 or pp < 1 or world != tp * pp:
        print(f"{tool}: --tp {tp} x --pp {pp} needs exactly {tp * pp} processes but this is a world of {world}: "
              f"run it under `torchrun --nproc-per-node {max(tp * pp, 1)}` (or plain python when both are 1)",
              file=sys.stderr)
        return 2
    try:
        init_parallel(ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp), seed=0)
        work()
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"{tool}: {err}", file=sys.stderr)
        return 1
    finally:
        destroy_parallel()
    return 0
