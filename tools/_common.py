"""What both converter CLIs share: the process group for a tp x pp (x ep) layout, and error reporting."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


def run_in_layout(tool: str, tp: int, pp: int, work: Callable[[], object], ep: int = 1) -> int:
    """Initialise a world of exactly tp * pp * ep processes (torchrun, or this process when 1), run
    `work`, tear down. MoE experts split over `ep` ranks, which are data-parallel ranks for the dense
    layers (each holds a copy). Known problems (bad layout, unsupported model, missing checkpoint)
    print one line."""
    from megatron_speed.config.schema import ParallelConfig
    from megatron_speed.parallel import destroy_parallel, init_parallel

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp < 1 or pp < 1 or ep < 1 or world != tp * pp * ep:
        print(f"{tool}: --tp {tp} x --pp {pp} x --ep {ep} needs exactly {tp * pp * ep} processes but this is a "
              f"world of {world}: run it under `torchrun --nproc-per-node {max(tp * pp * ep, 1)}` (or plain python "
              "when all are 1)", file=sys.stderr)
        return 2
    try:
        init_parallel(ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp, expert_parallel_size=ep),
                      seed=0)
        work()
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"{tool}: {err}", file=sys.stderr)
        return 1
    finally:
        destroy_parallel()
    return 0
