"""The RL loop: generate -> score -> curriculum -> advantages -> train step -> refit -> evaluate/save.

`Trainer.fit()` is the whole algorithm at a glance; every phase is one call into its room. Setup
(process groups, data, model, engine, grader pool) lives in `megatron_speed/setup.py`.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_speed.algorithms import ESTIMATORS, broadcast_to_tokens, js_shrinkage, overlong_penalty
from megatron_speed.algorithms.corrections import CORRECTIONS
from megatron_speed.checkpoint.resume import checkpoints_root, load_checkpoint, save_checkpoint
from megatron_speed.config.schema import AlgorithmConfig
from megatron_speed.curriculum.batch import build_train_batch
from megatron_speed.evaluate import EvalReport, run_eval
from megatron_speed.kernels import js_token_advantages_from_lengths, response_spans
from megatron_speed.metrics import PhaseTimer
from megatron_speed.metrics.summary import rollout_metrics, train_metrics
from megatron_speed.metrics.targets import time_to_target
from megatron_speed.records import TrainBatch
from megatron_speed.rewards.scoring import score_groups
from megatron_speed.rollout.placement import Colocated, Delivery, EngineSide, TrainerSide
from megatron_speed.rollout.replicas import score_and_gather
from megatron_speed.setup import Components


@dataclass(frozen=True)
class RunSummary:
    steps: int
    seconds: float  # RL wall-clock: generation, scoring, training, refit (evaluation and saving excluded)
    eval_seconds: float
    warm_start_accuracy: float
    final_accuracy: float
    accuracy_curve: list[tuple[float, float]]  # (RL seconds, pooled held-out accuracy: see EvalReport)
    # Per held-out set: (RL seconds, its headline metric), and which metric that is ("avg@16", "greedy").
    set_curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    set_metrics: dict[str, str] = field(default_factory=dict)
    eval_steps: list[int] = field(default_factory=list)  # the RL step of each evaluation (curve point)
    # Per `eval.targets` entry: {"target", "seconds", "step"} at which its set curve (avg@k when sampled,
    # else greedy) first reaches the target, interpolated; None when never (metrics/targets.py).
    time_to_target: dict[str, dict[str, float | None]] = field(default_factory=dict)
    save_seconds: float = 0.0  # checkpoints and HF exports, excluded from `seconds` as upstream does
    stopped_by_signal: bool = False  # SIGTERM (preemption): checkpointed at `steps`, the run is not over

    @property
    def gain_points(self) -> float:
        return 100.0 * (self.final_accuracy - self.warm_start_accuracy)


class Trainer:
    def __init__(self, parts: Components) -> None:
        self.parts, self.cfg = parts, parts.cfg
        self.timer = PhaseTimer()
        self.curve: list[tuple[float, float]] = []
        self.started = 0.0
        self.last_eval_step = 0
        # Evaluation and saving (checkpoints, HF exports) are excluded from the RL clock, as the
        # papers' "pure training" hours exclude validation and `save_checkpoint`.
        self.eval_seconds = 0.0
        self.save_seconds = 0.0
        self.set_curves: dict[str, list[tuple[float, float]]] = {}
        self.set_metrics: dict[str, str] = {}
        self.eval_steps: list[int] = []
        self.eval_scalars: dict[str, float] = {}  # the latest evaluation's metrics (evaluate.py)
        self.warm = 0.0  # held-out accuracy before RL (restored on resume)
        self.stop_step = parts.cfg.run.steps  # the last step this process runs (see fit's stop_after)
        self.rollout_timer = PhaseTimer()  # generate/score: timed where the rollout runs, shipped with the batch
        self.resumed_rollout: dict[str, Any] | None = None  # curriculum + engine calls of the checkpoint
        self.rollout = make_placement(parts, produce=self.produce, evaluate=self.run_eval)

    @property
    def engine_version(self) -> int:
        """The policy version of the weights this rank's engine generates with."""
        p = self.parts
        return self.rollout.version if p.dims.role == "engine" else p.actor.version  # type: ignore[union-attr]

    def fit(self, stop_after: int | None = None) -> RunSummary:
        """Train to `run.steps`; `stop_after` pauses this process after that many steps (a job's time
        slice: a checkpoint is written at the pause when `run.save_every` is on, no final evaluation).

        The rollout half (`produce`: generate -> score -> curriculum) runs inside `rollout.next_batch`
        when colocated, and on the engine ranks (`serve`) when disaggregated (rollout/placement.py)."""
        p, cfg = self.parts, self.cfg
        if p.dims.role == "engine":
            return self.serve()
        self.started = time.perf_counter()
        step = self.resume(p.resume_from) if p.resume_from is not None else 0
        self.rollout.begin(step, self.resumed_rollout)
        if p.resume_from is None:
            self.warm = self.evaluate(0)
            p.logger.log(0, {**self.eval_scalars, **p.data_metrics})
        self.stop_step = cfg.run.steps if stop_after is None else min(cfg.run.steps, step + stop_after)
        while step < self.stop_step and not self._out_of_time():
            ready = self.rollout.next_batch()  # generate -> score -> curriculum, here or on the engine ranks
            if ready is None:
                break  # out of time between generation calls
            step += 1
            batch = build_train_batch(ready.groups, pad_id=p.pad_id).to(p.device)
            with self.timer("advantages"):
                advantages, adv_stats = compute_advantages(batch, cfg.algorithm, horizon=cfg.rollout.max_new_tokens)
            with self.timer("sleep"):  # colocated: free the KV cache and weights while the actor trains
                self.rollout.before_train()
            with self.timer("train"):
                stats = {**self.train_step(batch, advantages), **adv_stats}
            with self.timer("refit"):
                stats.update(self.rollout.refit(evaluate=self._eval_due(step)).metrics())
            self.log(step, ready, batch, stats)
            stop = p.stop is not None and p.stop.requested()  # SIGTERM on any trainer rank: save this step, leave
            self.maybe_save(step, force=stop)
            if stop:
                break
        if step < cfg.run.steps and not self._out_of_time():  # paused (stop_after, SIGTERM): not over
            self.rollout.end()
            return self.summary(step, final=self.curve[-1][1])
        final = self.curve[-1][1] if self.last_eval_step == step else self.evaluate(step)
        if self.last_eval_step != step:
            p.logger.log(step, self.eval_scalars)
        self.rollout.end()
        self.save_hf("final")
        return self.summary(step, final=final)

    def produce(self) -> Delivery | None:
        """The rollout half of a step: generation calls until the curriculum emits a training batch
        (None when the run is out of time between calls; a disaggregated engine never is)."""
        p, timer = self.parts, self.rollout_timer
        groups, faults, busy = [], Counter(), []
        while True:
            started = time.time()
            with timer("generate"):  # this engine replica's share of the call (all of it on one rank)
                mine = p.engine.generate(p.replicas.local(p.curriculum.plan()), policy_version=self.engine_version)
            with timer("score"):  # each replica grades its share once; every rank then gets all groups
                call, call_faults = score_and_gather(p.replicas, mine, lambda g: score_groups(p.rewards, g))
            busy.append((started, time.time()))
            faults.update(call_faults)
            groups += call  # everything generated for this step, over one or more calls
            train_groups = p.curriculum.update(call)
            if train_groups is not None:
                times = timer.pop()
                scalars = {**rollout_metrics(groups, times), **dict(faults), **times, **p.curriculum.metrics()}
                return Delivery(index=p.actor.version + 1 if p.actor is not None else 0, groups=train_groups,
                                scalars=scalars, engine_busy=busy)
            if p.dims.role == "colocated" and self._out_of_time():
                return None  # not enough finished groups yet, and no time to generate again

    def serve(self) -> RunSummary:
        """An engine rank of a disaggregated run: the rollout half of the loop, batch after batch, handed
        to the trainer ranks; new weights and evaluations are taken between generation calls."""
        side: EngineSide = self.rollout  # type: ignore[assignment]
        side.begin()
        while side.turn():
            side.deliver(self.produce())  # type: ignore[arg-type]
        return RunSummary(steps=side.delivered, seconds=0.0, eval_seconds=0.0, warm_start_accuracy=0.0,
                          final_accuracy=0.0, accuracy_curve=[])

    def summary(self, step: int, *, final: float) -> RunSummary:
        return RunSummary(steps=step, seconds=self._rl_seconds(), eval_seconds=self.eval_seconds,
                          warm_start_accuracy=self.warm, final_accuracy=final, accuracy_curve=list(self.curve),
                          set_curves={k: list(v) for k, v in self.set_curves.items()},
                          set_metrics=dict(self.set_metrics), eval_steps=list(self.eval_steps),
                          time_to_target=time_to_target(self.set_curves, self.eval_steps, self.cfg.eval.target_map()),
                          save_seconds=self.save_seconds,
                          stopped_by_signal=self.parts.stop is not None and self.parts.stop.stopped)

    def train_step(self, batch: TrainBatch, token_adv: torch.Tensor) -> dict[str, float]:
        """Recompute old (proximal) log-probs with the actor, correct for the engine's sampling
        (`algorithm.is_correction`), then PPO-clip updates over the batch."""
        actor = self.parts.actor
        ages = self._check_staleness(batch)
        old_logprobs = actor.compute_logprobs(batch.tokens, mask=batch.response_mask)
        stats = mismatch_by_age(old_logprobs, batch.rollout_logprobs, batch.response_mask, ages)
        if self.cfg.algorithm.is_correction != "none":
            token_adv, is_stats = corrected_advantages(token_adv, old_logprobs, batch, self.cfg.algorithm)
            stats.update(is_stats)
        stats.update(actor.train_step(batch.tokens, batch.response_mask, old_logprobs, token_adv))
        return stats

    def _check_staleness(self, batch: TrainBatch) -> list[int]:
        """Each row's age in policy versions; with `rollout.max_staleness` >= 1 none may exceed it (the
        engines and the curriculum keep to it; this guards the invariant)."""
        ages = batch.staleness(self.parts.actor.version)
        limit = self.cfg.rollout.max_staleness
        if limit and ages and max(ages) > limit:
            raise RuntimeError(f"a batch for policy version {self.parts.actor.version} holds a sample {max(ages)} "
                               f"versions old, over rollout.max_staleness={limit}")
        return ages

    def evaluate(self, step: int) -> float:
        """Held-out evaluation per set: greedy accuracy, plus avg@k/pass@k when `eval.k` >= 1.

        Returns greedy accuracy over all held-out prompts (the accuracy-vs-time curve, from which the
        evaluation's own time is excluded); `step` is the RL step it follows (0: the warm start). Every
        metric (`eval/accuracy`, `eval/<set>/...`) is kept in `eval_scalars` for the step's log line, and
        the full report goes to `eval/step_<policy version>.json`.
        """
        p = self.parts
        started = time.perf_counter()
        report = self.rollout.evaluate(p.actor.version, lambda: self.run_eval(p.actor.version))
        self.eval_seconds += time.perf_counter() - started
        if p.dims.is_main:
            path = p.out_dir / "eval" / f"step_{p.actor.version:06d}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report.to_json(), indent=2))
        self.eval_scalars = report.scalars()
        now, acc = self._rl_seconds(), float(report.pooled_accuracy)
        self.curve.append((now, acc))
        self.eval_steps.append(step)
        for name, result in report.sets.items():
            self.set_metrics[name], value = result.headline
            self.set_curves.setdefault(name, []).append((now, value))
        return acc

    def run_eval(self, version: int) -> EvalReport:
        """Held-out evaluation on this rank's engine (colocated, or an engine rank when asked)."""
        p = self.parts
        return run_eval(p.engine, p.rewards, p.eval_records, self.cfg.eval, policy_version=version,
                        replicas=p.replicas)

    def save_hf(self, tag: str) -> None:
        started = time.perf_counter()
        self.parts.save_hf(tag)
        self.save_seconds += time.perf_counter() - started

    def _eval_due(self, step: int) -> bool:
        every = self.cfg.eval.every
        return bool(every and step % every == 0) or step == self.cfg.run.steps

    def log(self, step: int, ready: Delivery, batch: TrainBatch, stats: dict[str, float]) -> None:
        cfg, logger = self.cfg, self.parts.logger
        times = self.timer.pop()
        ages = batch.staleness(step - 1)
        scalars = {**ready.scalars, **train_metrics(batch, stats, times), **times, **staleness_metrics(ages),
                   **self.rollout.step_metrics(ready, step - 1), "time/rl_seconds": self._rl_seconds()}
        if self._eval_due(step):
            self.evaluate(step)
            scalars.update(self.eval_scalars)
            self.last_eval_step = step
        if cfg.run.save_hf_every and step % cfg.run.save_hf_every == 0:
            self.save_hf(f"step_{step:06d}")
        logger.log_histogram(step, "rollout/pass_rate", [g.pass_rate for g in ready.groups])
        logger.log_histogram(step, "async/staleness", ages)
        logger.log(step, scalars)
        self._ledger(step, batch, ages)

    def _ledger(self, step: int, batch: TrainBatch, ages: list[int]) -> None:
        """`trained.jsonl`: the prompts each step trained and their samples' ages (audits exactly-once
        training across a resume; truncated to the checkpoint on resume like metrics.jsonl)."""
        if self.parts.dims.is_main:
            with (self.parts.out_dir / "trained.jsonl").open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "uids": batch.uids, "staleness": ages}) + "\n")

    # --- checkpoint / resume (megatron_speed/checkpoint) ---------------------------------------------
    def state_dict(self, step: int) -> dict[str, Any]:
        """Everything the next steps depend on besides the actor's weights and optimizer."""
        p = self.parts
        rollout = self.rollout.rollout_state()
        return {"step": step, "actor_version": p.actor.version, "engine_calls": rollout["engine_calls"],
                "curriculum": rollout["curriculum"], "history": p.logger.history, "curve": self.curve,
                "warm_start_accuracy": self.warm, "last_eval_step": self.last_eval_step,
                "eval_seconds": self.eval_seconds, "save_seconds": self.save_seconds,
                "set_curves": self.set_curves, "set_metrics": self.set_metrics, "eval_steps": self.eval_steps,
                "rl_seconds": self._rl_seconds()}

    def maybe_save(self, step: int, *, force: bool = False) -> None:
        """Every `run.save_every` steps and at a pause; `force` (a stop signal) saves even with saving off."""
        every = self.cfg.run.save_every
        if force or (every and (step % every == 0 or step == self.stop_step)):
            p, started = self.parts, time.perf_counter()
            save_checkpoint(checkpoints_root(p.out_dir), step, actor=p.actor, hf_src=p.hf_path,
                            trainer_state=self.state_dict(step), keep_last=self.cfg.run.keep_last,
                            layout={"world_size": p.dims.world_size, "tp": p.dims.tp, "pp": p.dims.pp,
                                    "cp": p.dims.cp, "ep": p.dims.ep})
            self.save_seconds += time.perf_counter() - started

    def resume(self, path: Path) -> int:
        """Restore actor, engine weights, curriculum, RNG streams and logs from `path`; returns its step."""
        p = self.parts
        state = load_checkpoint(path, actor=p.actor, world_size=p.dims.world_size)
        p.actor.version = state["actor_version"]
        # The curriculum and the engine's call count go to wherever the rollout runs (`rollout.begin`).
        self.resumed_rollout = {"curriculum": state["curriculum"], "engine_calls": state["engine_calls"]}
        p.logger.history[:] = state["history"]
        self.curve, self.warm = list(state["curve"]), state["warm_start_accuracy"]
        self.last_eval_step, self.eval_seconds = state["last_eval_step"], state["eval_seconds"]
        self.save_seconds = state.get("save_seconds", 0.0)
        self.set_curves = {k: [tuple(p) for p in v] for k, v in state.get("set_curves", {}).items()}
        self.set_metrics = dict(state.get("set_metrics", {}))
        self.eval_steps = list(state.get("eval_steps", []))
        self.started = time.perf_counter() - state["rl_seconds"] - self.eval_seconds - self.save_seconds
        return int(state["step"])

    def _rl_seconds(self) -> float:
        return time.perf_counter() - self.started - self.eval_seconds - self.save_seconds

    def _out_of_time(self) -> bool:
        limit = self.cfg.run.max_wall_seconds
        return bool(limit) and self._rl_seconds() > limit


def compute_advantages(batch: TrainBatch, cfg: AlgorithmConfig, *, horizon: int) -> tuple[torch.Tensor,
                                                                                       dict[str, float]]:
    """Token advantages [N, S-1]: shape rewards (DAPO overlong penalty, if on), then the grouped estimator.

    James-Stein goes through the fused kernel's dispatch (Triton on CUDA tensors, the PyTorch
    reference on CPU); the other estimators are per-sample and broadcast onto the response tokens.
    """
    rewards = batch.rewards
    stats: dict[str, float] = {}
    if cfg.overlong_buffer_length:
        lengths = batch.response_mask.sum(dim=1)
        penalty = overlong_penalty(lengths, max_length=horizon, buffer_length=cfg.overlong_buffer_length,
                                   factor=cfg.overlong_factor)
        rewards = rewards + penalty
        stats["advantage/overlong_penalty_mean"] = float(penalty.mean())
    if cfg.advantage == "js":
        # Response spans, not the float mask: the kernel then reads no [N, T] input (one span per row).
        token_adv = js_token_advantages_from_lengths(rewards, batch.group_offsets, *response_spans(batch.response_mask),
                                                     batch.response_mask.shape[1], cfg.js_lambda_variant)
        lam = js_shrinkage(rewards, batch.group_offsets, lambda_variant=cfg.js_lambda_variant)
        stats["advantage/js_lambda_mean"] = float(lam.mean())
    else:
        advantages = ESTIMATORS[cfg.advantage](rewards, batch.group_offsets, **cfg.estimator_options)
        token_adv = broadcast_to_tokens(advantages, batch.response_mask)
    n = batch.response_mask.sum().clamp(min=1)
    stats["advantage/token_abs_mean"] = float(token_adv.abs().sum() / n)
    return token_adv, stats


def corrected_advantages(token_adv: torch.Tensor, old_logprobs: torch.Tensor, batch: TrainBatch,
                         cfg: AlgorithmConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The off-policy correction `algorithm.is_correction` (algorithms/corrections.py): its per-token
    weight on the policy-gradient loss, applied as the same weight on the token's advantage (identical
    loss and clip decisions), so the actor's loss needs no extra input."""
    weights, s = CORRECTIONS[cfg.is_correction](old_logprobs, batch.rollout_logprobs, batch.response_mask,
                                                cap=cfg.is_cap, beta=cfg.is_beta)
    n = float(s["tokens"].clamp(min=1))
    return token_adv * weights, {"mismatch/is_weight_mean": float(s["weight_sum"]) / n,
                                 "mismatch/is_truncated_fraction": float(s["truncated_tokens"]) / n,
                                 "mismatch/is_masked_fraction": float(s["masked_tokens"]) / n}


def _mismatch(actor_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """How far the engine's sampled-token log-probs are from the actor's for the same weights."""
    n = mask.sum().clamp(min=1)
    diff = (engine_logprobs - actor_logprobs) * mask  # log(pi_engine / pi_actor) on sampled tokens
    k3 = (torch.exp(-diff) - 1 + diff) * mask  # KL(engine || actor) estimator on engine samples
    mean_abs = float(diff.abs().sum() / n)
    if not math.isfinite(mean_abs):
        mean_abs = float("nan")
    return {"mismatch/logprob_abs_diff": mean_abs, "mismatch/logprob_max_abs_diff": float(diff.abs().max()),
            "mismatch/kl_k3": float(k3.sum() / n)}


def mismatch_by_age(actor_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor,
                    ages: list[int]) -> dict[str, float]:
    """`_mismatch` over the batch, and again per sample age: age 0 is the engine-vs-actor gap alone
    (same weights, different kernels), age a >= 1 adds a policy versions of lag."""
    out = _mismatch(actor_logprobs, engine_logprobs, mask)
    if len(set(ages)) > 1 or (ages and ages[0] != 0):
        rows = torch.tensor(ages, device=mask.device)
        for age in sorted(set(ages)):
            part = _mismatch(actor_logprobs[rows == age], engine_logprobs[rows == age], mask[rows == age])
            out.update({f"{k}/age{age}": v for k, v in part.items()})
    return out


def staleness_metrics(ages: list[int]) -> dict[str, float]:
    """Mean and max sample age in policy versions and the share of samples at each age."""
    if not ages:
        return {}
    counts = Counter(ages)
    return {"async/staleness_mean": sum(ages) / len(ages), "async/staleness_max": float(max(ages)),
            **{f"async/staleness_fraction/{a}": n / len(ages) for a, n in sorted(counts.items())}}


def make_placement(parts: Components, *, produce: Any, evaluate: Any) -> Colocated | TrainerSide | EngineSide:
    """This rank's side of the loop (rollout/placement.py)."""
    role = parts.dims.role
    if role == "engine":
        return EngineSide(parts, evaluate)
    return TrainerSide(parts) if role == "trainer" else Colocated(parts, produce)
