"""Stop at a step boundary on SIGTERM: SLURM preemption, `sbatch --signal`, torchrun's shutdown.

SLURM asks a job to leave with SIGTERM (preemption with `PreemptMode=REQUEUE`, `scontrol requeue`,
the time limit reached early through `--signal=TERM@SECONDS`), then SIGKILLs it after its grace
time; torchrun forwards SIGTERM to its workers and waits `TORCH_ELASTIC_SHUTDOWN_TIMEOUT` seconds.
The handler only sets a flag. The trainer asks `requested()` once per step, after the step's
update: the flag is all-reduced (MAX) over the world, so every rank stops after the same step even
when the signal reached them at different moments, writes the checkpoint of that step together and
leaves; a requeued or restarted job resumes from it (`run.resume=auto`).

Left out on purpose: SIGINT (Ctrl-C stays an immediate stop) and stopping in the middle of a step
(its state is half-updated; the checkpoint is always that of a finished step).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM,)
STOPPED_EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM: "not finished"


class StopOnSignal:
    """Turns SIGTERM into a request to stop after the current step (installed in the main thread only)."""

    def __init__(self, device: torch.device, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.device = device
        self.received: int | None = None  # the signal that reached this rank, if any
        self.stopped = False  # every rank agreed to stop: set by `requested()`
        self._previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def requested(self) -> bool:
        """Whether any rank got a stop signal (collective: every rank calls it at the same step)."""
        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.stopped = bool(flag.item())
        return self.stopped

    def restore(self) -> None:
        """Put back the handlers that were there before (a process that builds several runs)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
