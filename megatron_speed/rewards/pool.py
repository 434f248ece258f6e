"""A pool of grader processes with a hard per-item timeout: scoring never stalls and never raises.

Graders (math-verify and sympy underneath) can hang or crash on adversarial responses, so each item
is graded in a worker process that the parent can kill. Workers are started once with the "spawn"
context (the parent holds torch and vLLM threads, which must never be forked), each talks to the
parent over its own Pipe, and grades one item at a time in its main thread, where math-verify's
signal-based timeouts work. The parent hands items to idle workers and waits on all pipes at once
with a deadline per busy worker:

- the grader returns          -> its score;
- the grader raises           -> 0.0, counted in `errors`, the worker is kept;
- the worker dies             -> 0.0, counted in `errors`, the worker is replaced (a worker that
                                 dies before acknowledging the item hands it to another worker:
                                 it was lost in transit, not graded);
- the deadline passes         -> 0.0, counted in `timeouts`, the worker is killed and replaced.

Only a pool that cannot start its workers at all (an unimportable grader, a broken interpreter)
raises. Deliberately left out: retries (a timed-out answer is wrong, not unlucky) and batching
several items per message (grading dominates the pipe round trip).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
import time
import traceback
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import Self

from megatron_speed.rewards.graders import resolve_grader

logger = logging.getLogger(__name__)

_START_TIMEOUT_SECONDS = 120.0  # a fresh worker must import its grader within this time
_STOP_GRACE_SECONDS = 2.0
_MAX_START_FAILURES = 3  # workers in a row that die before ready: the grader cannot run here


@dataclass(frozen=True)
class ScoreResult:
    """Scores in the order of the items, plus how many items timed out or errored (scored 0.0)."""

    scores: list[float]
    timeouts: int
    errors: int
    seconds: float


@dataclass
class _Tally:
    """The state of one `score` call: results so far and the items not yet handed out."""

    scores: list[float]
    pending: deque[int]
    timeouts: int = 0
    errors: int = 0
    first_error: str | None = None


@dataclass(eq=False)
class _Worker:
    process: BaseProcess
    conn: Connection
    deadline: float  # monotonic time by which the worker must send its next message
    ready: bool = False
    item: int | None = None  # index of the item being graded; None while idle
    acked: bool = False  # the worker has received `item` and started grading it


def _worker_main(conn: Connection, grader_name: str) -> None:
    """Resolve the grader, report ready, then grade one `(response, answer)` per message until None."""
    # Ctrl-C and SIGTERM (SLURM signals every process of a job step) are the parent's to handle: it
    # finishes the step and stops us itself, so a preemption never turns a graded item into a crash.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        grader = resolve_grader(grader_name)
    except BaseException:
        conn.send(("fatal", traceback.format_exc()))
        return
    conn.send(("ready", None))
    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        if item is None:
            return
        conn.send(("start", None))
        response, answer = item
        try:
            message = ("ok", float(grader(response, answer)))
        except Exception:
            message = ("error", traceback.format_exc(limit=8))
        conn.send(message)


class RewardPool:
    """Grades `(response, gold_answer)` pairs concurrently in `num_workers` reusable processes.

    Use as a context manager (or call `close()`); workers are daemons, so they also die with the
    parent. Not thread-safe: one `score` call at a time.
    """

    def __init__(self, grader: str, num_workers: int, timeout_seconds: float) -> None:
        if num_workers < 1:
            raise ValueError(f"RewardPool num_workers ({num_workers}) must be >= 1")
        if not timeout_seconds > 0:
            raise ValueError(f"RewardPool timeout_seconds ({timeout_seconds}) must be > 0")
        resolve_grader(grader)  # fail in the caller, with the registry's message, before spawning
        self._grader = grader
        self._timeout = float(timeout_seconds)
        self._ctx = multiprocessing.get_context("spawn")
        self._closed = False
        self._start_failures = 0
        self._workers: list[_Worker] = []
        try:
            self._workers = [self._spawn() for _ in range(num_workers)]
            tally = _Tally(scores=[], pending=deque())
            while not all(worker.ready for worker in self._workers):
                self._step(tally)
        except BaseException:
            self.close()
            raise

    @property
    def worker_pids(self) -> list[int | None]:
        """Process ids of the current workers (they change when a worker is replaced)."""
        return [worker.process.pid for worker in self._workers]

    def score(self, items: Sequence[tuple[str, str]]) -> ScoreResult:
        """Grade every `(response, answer)`; the result's scores are in the order of `items`."""
        if self._closed:
            raise RuntimeError("RewardPool.score called after close()")
        start = time.monotonic()
        tally = _Tally(scores=[0.0] * len(items), pending=deque(range(len(items))))
        try:
            while tally.pending or any(worker.item is not None for worker in self._workers):
                self._dispatch(items, tally.pending)
                self._step(tally)
        except BaseException:
            self._abandon_busy()  # their late answers must not land in the next call's scores
            raise
        if tally.first_error is not None:
            logger.warning("%d of %d items raised in grader %r; first error:\n%s",
                           tally.errors, len(items), self._grader, tally.first_error)
        return ScoreResult(scores=tally.scores, timeouts=tally.timeouts, errors=tally.errors,
                           seconds=time.monotonic() - start)

    def close(self) -> None:
        """Stop every worker: ask politely, then kill whatever is still running. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            with contextlib.suppress(OSError):
                worker.conn.send(None)
        for worker in self._workers:
            worker.process.join(timeout=_STOP_GRACE_SECONDS)
            self._kill(worker)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=_worker_main, args=(child_conn, self._grader),
                                    name="reward-worker", daemon=True)
        process.start()
        child_conn.close()  # the child holds the only other end, so its death reads as EOF here
        return _Worker(process=process, conn=parent_conn,
                       deadline=time.monotonic() + _START_TIMEOUT_SECONDS)

    def _dispatch(self, items: Sequence[tuple[str, str]], pending: deque[int]) -> None:
        """Hand the next pending items to idle workers and start their deadlines."""
        for worker in self._workers:
            if not pending:
                return
            if not worker.ready or worker.item is not None:
                continue
            index = pending.popleft()
            response, answer = items[index]
            try:
                worker.conn.send((response, answer))
            except OSError:
                pending.appendleft(index)  # the idle worker died; the item is not to blame
                self._replace(worker)
                continue
            worker.item, worker.acked = index, False
            worker.deadline = time.monotonic() + self._timeout

    def _step(self, tally: _Tally) -> None:
        """Wait for the next message, death or deadline among the workers, and handle it."""
        waiting = [w for w in self._workers if w.item is not None or not w.ready]
        timeout = None
        if waiting:
            timeout = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
        handles: dict[object, _Worker] = {}
        for worker in self._workers:
            handles[worker.conn] = worker
            handles[worker.process.sentinel] = worker
        ready = wait(list(handles), timeout)
        woken = {id(handles[h]): handles[h] for h in ready}
        for worker in woken.values():
            self._receive(worker, tally)
        now = time.monotonic()
        for worker in list(self._workers):
            if (worker.item is not None or not worker.ready) and now >= worker.deadline:
                self._expire(worker, tally)

    def _receive(self, worker: _Worker, tally: _Tally) -> None:
        """Handle one message from `worker`, or its death if its pipe is closed."""
        try:
            kind, payload = worker.conn.recv()
        except (EOFError, OSError):
            self._on_death(worker, tally)
            return
        if kind == "ready":
            worker.ready = True
            self._start_failures = 0
        elif kind == "start":
            worker.acked = True
        elif kind == "fatal":
            raise RuntimeError(f"reward worker could not load grader {self._grader!r}:\n{payload}")
        elif worker.item is not None:
            if kind == "ok":
                tally.scores[worker.item] = payload
            else:
                tally.errors += 1
                tally.first_error = tally.first_error or payload
            worker.item = None

    def _on_death(self, worker: _Worker, tally: _Tally) -> None:
        """A worker's pipe closed: a started item is an error, an unacknowledged one goes back in line.

        Several workers in a row dying before they are ready means the grader cannot run here: raise.
        """
        worker.process.join(timeout=_STOP_GRACE_SECONDS)
        code = worker.process.exitcode
        if not worker.ready:
            self._start_failures += 1
            if self._start_failures >= _MAX_START_FAILURES:
                raise RuntimeError(f"{self._start_failures} reward workers for grader {self._grader!r} "
                                   f"in a row exited during start-up (last exit code {code})")
        elif worker.item is not None and not worker.acked:
            tally.pending.appendleft(worker.item)
        elif worker.item is not None:
            tally.errors += 1
            tally.first_error = tally.first_error or f"worker exited with code {code} while grading"
        logger.warning("reward worker %s exited with code %s; replacing it", worker.process.pid, code)
        self._replace(worker)

    def _expire(self, worker: _Worker, tally: _Tally) -> None:
        """Kill a worker past its deadline; a message that beat the kill still counts."""
        if worker.conn.poll():
            self._receive(worker, tally)
            return
        if not worker.ready:
            raise RuntimeError(f"reward worker for grader {self._grader!r} did not start within "
                               f"{_START_TIMEOUT_SECONDS:.0f}s")
        tally.timeouts += 1
        logger.info("reward item %d exceeded %.1fs; replacing worker %s",
                    worker.item, self._timeout, worker.process.pid)
        self._replace(worker)

    def _abandon_busy(self) -> None:
        if self._closed:
            return
        for worker in list(self._workers):
            if worker.item is not None:
                self._replace(worker)

    def _replace(self, worker: _Worker) -> None:
        self._kill(worker)
        self._workers[self._workers.index(worker)] = self._spawn()

    @staticmethod
    def _kill(worker: _Worker) -> None:
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(timeout=_STOP_GRACE_SECONDS)
        worker.conn.close()
