"""Where the rollout half of the loop runs: on this rank (colocated) or on engine ranks of their own.

The loop in `trainer.py` is one loop for both placements. Its rollout half (generate -> score ->
curriculum, until a training batch is ready) is `Trainer.produce`, which returns a `Delivery`; its
training half (advantages -> train -> refit -> log/save) consumes one. The placement object says how
a delivery reaches the training half and how the new weights reach the engines:

* `Colocated`: `next_batch` runs `produce` right here; `refit` is the level-2 sleep/wake and the
  in-process bucketed refit; evaluation runs on this rank's engine.
* `TrainerSide` (disaggregated, trainer ranks): `next_batch` takes the next delivery from the
  mailbox (`parallel/spanning.py`); `refit` streams the export to the engine ranks
  (`rollout/transfer.py`); evaluation is requested from the engine ranks, which evaluate the weights
  of that version before their next generation call.
* `EngineSide` (disaggregated, engine ranks): between generation calls `turn` loads new weights,
  runs requested evaluations, and waits while the next batch would be more than
  `rollout.max_staleness` versions behind the weights that will train it (0 = synchronous: every call
  uses the newest weights, exactly the colocated order); `deliver` posts the batch with the
  curriculum's state right after it was emitted, so a checkpoint of step s resumes the curriculum
  where batch s left it (prompts in flight are drawn again: each prompt of an epoch trains once).

Mailbox keys (written once each): `start` (trainer -> engines: resume state), `batch/<k>`,
`refit/<k>` (the policy version of the k-th weight broadcast) and `refit_ack/<k>`,
`eval_request/<v>` and `eval_report/<v>`, `stop`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from megatron_speed.records import RolloutGroup
from megatron_speed.rollout.buckets import RefitStats
from megatron_speed.rollout.transfer import receive_buckets, send_weights

Span = tuple[float, float]  # (start, end), time.time() seconds: comparable across the ranks of one host


@dataclass
class Delivery:
    """One finished training batch, from the rollout half of the loop to the training half."""

    index: int  # the run's batch number, 1-based: it trains policy version index - 1
    groups: list[RolloutGroup]
    scalars: dict[str, float]  # rollout, scoring and curriculum metrics and generate/score times
    rollout_state: dict[str, Any] | None = None  # disaggregated: curriculum + engine calls as emitted
    engine_busy: list[Span] = field(default_factory=list)  # generate + score spans that made it
    engine_idle: float = 0.0  # seconds the engines waited (staleness bound) while making it


class Colocated:
    """Actor and engine on every rank: phases alternate, nothing overlaps."""

    def __init__(self, parts: Any, produce: Callable[[], Delivery | None]) -> None:
        self.parts, self.produce = parts, produce

    def begin(self, step: int, rollout_state: dict[str, Any] | None) -> None:
        if rollout_state is not None:
            self.parts.engine.calls = rollout_state["engine_calls"]
            self.parts.curriculum.load_state_dict(rollout_state["curriculum"])
            self.parts.engine.sleep()  # the fresh engine holds the initial weights: refit in the usual order
            self.refit(evaluate=False)

    def next_batch(self) -> Delivery | None:
        return self.produce()

    def before_train(self) -> None:
        self.parts.engine.sleep()  # free the KV cache and weights while the actor trains (no-op on CPU)

    def refit(self, *, evaluate: bool) -> RefitStats:
        """Weights back, the new policy loaded in buckets, then the KV cache (vLLM's level-2 wake order).
        With `model.lora.refit=adapter` only the LoRA adapter travels (the engine kept the base weights)."""
        engine, actor = self.parts.engine, self.parts.actor
        engine.wake_up(["weights"])
        if engine.lora_rank:
            refit = engine.update_adapter(actor.export_adapter_weights(), actor.adapter_config(),
                                          version=actor.version + 1)
        else:
            refit = engine.update_weights(actor.export_hf_weights())
        engine.wake_up(["kv_cache"])
        return refit

    def evaluate(self, version: int, run: Callable[[], Any]) -> Any:
        return run()

    def rollout_state(self) -> dict[str, Any]:
        return {"curriculum": self.parts.curriculum.state_dict(), "engine_calls": self.parts.engine.calls}

    def step_metrics(self, delivery: Delivery, version: int) -> dict[str, float]:
        return {}

    def end(self) -> None:
        pass


class TrainerSide:
    """A trainer rank of a disaggregated run; the leader (global rank 0) speaks for all."""

    def __init__(self, parts: Any) -> None:
        self.parts = parts
        self.link = parts.dims.spanning
        self.leader = parts.dims.is_main
        self.refits = 0
        self.state: dict[str, Any] | None = None  # the last delivery's rollout state
        self.busy: list[Span] = []  # the actor's spans of work on a batch (up to its refit), for the overlap
        self.idle = 0.0  # seconds waited for the engines (a batch, a refit's start) since the last step's log
        self._busy_from = 0.0

    def _post(self, key: str, value: Any) -> None:
        if self.leader:
            self.link.post(key, value)

    def begin(self, step: int, rollout_state: dict[str, Any] | None) -> None:
        if rollout_state is None:  # fresh run: the warm-start evaluation comes before any generation
            self._post("eval_request/0", 0)
        self.state = rollout_state
        self._post("start", {"step": step, "rollout_state": rollout_state})
        if rollout_state is not None:
            self.refit(evaluate=False)

    def next_batch(self) -> Delivery | None:
        started = time.time()
        delivery: Delivery = self.link.take(f"batch/{self.parts.actor.version + 1}")
        self.idle += time.time() - started
        self.state = delivery.rollout_state
        self._busy_from = time.time()
        return delivery

    def before_train(self) -> None:
        pass

    def refit(self, *, evaluate: bool) -> RefitStats:
        """Post the request (and the evaluation, so the engines run it before generating again), wait
        for the engine leader to join, then stream the export to the engine ranks."""
        version, self.refits = self.parts.actor.version, self.refits + 1
        if evaluate:
            self._post(f"eval_request/{version}", version)
        self._post(f"refit/{self.refits}", version)
        started = time.time()
        if self._busy_from:  # the actor's work on this batch (advantages, train) ends here
            self.busy = [*self.busy[-7:], (self._busy_from, started)]
        self.link.take(f"refit_ack/{self.refits}")
        self.idle += time.time() - started
        cfg = self.parts.cfg.rollout
        return send_weights(self.parts.actor.export_hf_weights(), self.link.weights,
                            bucket_bytes=int(cfg.refit_bucket_mb * 2**20), device=self.link.weights_device)

    def evaluate(self, version: int, run: Callable[[], Any]) -> Any:
        if not self.link.has(f"eval_request/{version}"):
            self._post(f"eval_request/{version}", version)
        return self.link.take(f"eval_report/{version}")

    def rollout_state(self) -> dict[str, Any]:
        if self.state is None:
            raise RuntimeError("no delivery yet: the rollout state comes with the engines' first batch")
        return self.state

    def step_metrics(self, delivery: Delivery, version: int) -> dict[str, float]:
        """Idle time on both sides and how much of the batch's generation ran while the actor trained."""
        engine_busy = sum(b - a for a, b in delivery.engine_busy)
        overlap = sum(max(0.0, min(b, d) - max(a, c)) for a, b in delivery.engine_busy for c, d in self.busy)
        out = {"async/trainer_idle_seconds": self.idle, "async/engine_idle_seconds": delivery.engine_idle,
               "async/engine_busy_seconds": engine_busy, "async/overlap_seconds": overlap,
               "async/overlap_fraction": overlap / engine_busy if engine_busy > 0 else 0.0}
        self.idle = 0.0
        return out

    def end(self) -> None:
        self._post("stop", True)


class EngineSide:
    """An engine rank of a disaggregated run; its leader reads the mailbox and the engine world follows."""

    def __init__(self, parts: Any, evaluate: Callable[[int], Any]) -> None:
        self.parts, self.evaluate = parts, evaluate
        self.link = parts.dims.spanning
        self.leader = self.link.is_engine_leader
        self.lag = parts.cfg.rollout.max_staleness
        self.version = 0  # the policy version the engine holds
        self.refits = 0
        self.delivered = 0
        self.evaluated: set[int] = set()
        self.idle = 0.0

    def begin(self) -> None:
        """Wait for the trainer's start message; a resumed run restores the curriculum and the engine's
        call count as they were when the checkpoint's last batch was emitted."""
        start = self.link.take("start")
        self.delivered = int(start["step"])
        self.version = self.delivered
        state = start["rollout_state"]
        if state is not None:
            self.parts.curriculum.load_state_dict(state["curriculum"])
            self.parts.engine.calls = state["engine_calls"]
            self._receive()  # the checkpoint's weights, sent right after the start message

    def turn(self) -> bool:
        """Between generation calls: handle the trainer's requests; True = generate, False = stop."""
        while True:
            action = self._decide()
            if action == "refit":
                self._receive()
            elif action == "evaluate":
                report = self.evaluate(self.version)  # every engine rank decodes its share
                if self.leader:
                    self.link.post(f"eval_report/{self.version}", report)
                self.evaluated.add(self.version)
            elif action == "stop":
                return False
            elif action == "generate":
                return True
            else:  # "wait": the next batch would be too stale, or the run's batches are all delivered
                started = time.time()
                if self.leader:
                    self.link.wait_any(self._watched())
                self.idle += time.time() - started

    def _watched(self) -> list[str]:
        return [f"refit/{self.refits + 1}", f"eval_request/{self.version}", "stop"]

    def _decide(self) -> str:
        action = None
        if self.leader:
            if self.link.has(f"refit/{self.refits + 1}"):
                action = "refit"
            elif self.version not in self.evaluated and self.link.has(f"eval_request/{self.version}"):
                action = "evaluate"
            elif self.link.has("stop"):
                action = "stop"
            elif self.delivered < self.parts.cfg.run.steps and self.version >= self.delivered - self.lag:
                action = "generate"  # batch delivered + 1 trains version `delivered`: at most `lag` ahead
            else:
                action = "wait"
        if self.parts.dims.world_size > 1:  # every engine rank takes the leader's decision
            box = [action]
            dist.broadcast_object_list(box, src=0)
            action = box[0]
        return str(action)

    def _receive(self) -> None:
        self.refits += 1
        version = int(self.link.take(f"refit/{self.refits}"))
        if self.leader:
            self.link.post(f"refit_ack/{self.refits}", True)
        self.parts.engine.load_buckets(receive_buckets(self.link.weights, self.link.weights_device))
        self.version = version

    def deliver(self, delivery: Delivery) -> None:
        """Post the batch (leader) with the curriculum state as it stands right after emitting it."""
        self.delivered += 1
        delivery.index, delivery.engine_idle = self.delivered, self.idle
        delivery.rollout_state = {"curriculum": self.parts.curriculum.state_dict(),
                                  "engine_calls": self.parts.engine.calls}
        if self.leader:
            self.link.post(f"batch/{self.delivered}", delivery)
        self.idle = 0.0
