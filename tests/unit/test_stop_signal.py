"""SIGTERM as "stop after this step": the flag, its restore, the save that defers it, the reward workers.

The trainer's side (every rank stops after the same step, checkpoints it, a requeued or restarted job
resumes and matches an uninterrupted run) runs on a real SLURM cluster in tests/slurm; here the parts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch

from megatron_speed.checkpoint.resume import stop_signals_deferred
from megatron_speed.parallel.stop import STOPPED_EXIT_CODE, StopOnSignal
from megatron_speed.rewards import RewardPool


def _deliver(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.05)  # Python runs the handler at the next bytecode boundary of the main thread


def test_sigterm_requests_a_stop_and_the_old_handler_comes_back() -> None:
    before = signal.getsignal(signal.SIGTERM)
    stop = StopOnSignal(torch.device("cpu"))
    try:
        assert not stop.requested() and not stop.stopped
        _deliver(signal.SIGTERM)
        assert stop.received == signal.SIGTERM
        assert stop.requested() and stop.stopped  # a world of one agrees with itself
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is before
    assert STOPPED_EXIT_CODE == 143


def test_a_save_defers_sigterm_and_its_helper_processes_survive_it() -> None:
    stop = StopOnSignal(torch.device("cpu"))
    try:
        with stop_signals_deferred():
            # dist-checkpointing starts helpers like this during a save: they inherit the blocked signal
            helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
            time.sleep(1.0)
            helper.send_signal(signal.SIGTERM)  # what SLURM / torchrun send every process of the job
            _deliver(signal.SIGTERM)  # this process: the flag may be set now or once the block lifts
            time.sleep(0.5)
            assert helper.poll() is None, "the save's helper died of SIGTERM"
        time.sleep(0.05)
        assert stop.received == signal.SIGTERM  # the trainer stops after its step, as without a save
    finally:
        stop.restore()
        helper.kill()
        helper.wait()


def test_reward_workers_ignore_sigterm() -> None:
    items = [(rf"\boxed{{{i}}}", str(i)) for i in range(8)]
    with RewardPool("math_verify", num_workers=2, timeout_seconds=10.0) as pool:
        pids = pool.worker_pids
        for pid in pids:
            assert pid is not None
            os.kill(pid, signal.SIGTERM)  # a preemption signals every process; the parent stops them itself
        time.sleep(0.5)
        result = pool.score(items)
        assert pool.worker_pids == pids  # nobody died and was replaced
    assert result.scores == [1.0] * 8 and (result.timeouts, result.errors) == (0, 0)
