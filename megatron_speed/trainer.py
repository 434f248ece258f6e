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
from megatron_speed.algorithms.losses import truncated_is_weights
from megatron_speed.checkpoint.resume import checkpoints_root, load_checkpoint, save_checkpoint
from megatron_speed.config.schema import AlgorithmConfig
from megatron_speed.curriculum.batch import build_train_batch
from megatron_speed.evaluate import run_eval
from megatron_speed.kernels import js_token_advantages_from_lengths, response_spans
from megatron_speed.metrics import PhaseTimer
from megatron_speed.metrics.summary import rollout_metrics, train_metrics
from megatron_speed.records import RolloutGroup, TrainBatch
from megatron_speed.rewards.scoring import score_groups
from megatron_speed.rollout.buckets import RefitStats
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
        self.eval_scalars: dict[str, float] = {}  # the latest evaluation's metrics (evaluate.py)
        self.warm = 0.0  # held-out accuracy before RL (restored on resume)
        self.stop_step = parts.cfg.run.steps  # the last step this process runs (see fit's stop_after)

    def fit(self, stop_after: int | None = None) -> RunSummary:
        """Train to `run.steps`; `stop_after` pauses this process after that many steps (a job's time
        slice: a checkpoint is written at the pause when `run.save_every` is on, no final evaluation)."""
        p, cfg = self.parts, self.cfg
        self.started = time.perf_counter()
        step = self.resume(p.resume_from) if p.resume_from is not None else 0
        if p.resume_from is None:
            self.warm = self.evaluate()
            p.logger.log(0, {**self.eval_scalars, **p.data_metrics})
        groups, faults = [], Counter()
        self.stop_step = cfg.run.steps if stop_after is None else min(cfg.run.steps, step + stop_after)
        while step < self.stop_step and not self._out_of_time():
            with self.timer("generate"):  # this engine replica's share of the call (all of it on one rank)
                mine = p.engine.generate(p.replicas.local(p.curriculum.plan()), policy_version=p.actor.version)
            with self.timer("score"):  # each replica grades its share once; every rank then gets all groups
                call, call_faults = score_and_gather(p.replicas, mine, lambda g: score_groups(p.rewards, g))
            faults.update(call_faults)
            groups += call  # everything generated for this step, over one or more calls
            train_groups = p.curriculum.update(call)
            if train_groups is None:
                continue  # not enough finished groups yet; generate again
            step += 1
            batch = build_train_batch(train_groups, pad_id=p.pad_id).to(p.device)
            with self.timer("advantages"):
                advantages, adv_stats = compute_advantages(batch, cfg.algorithm, horizon=cfg.rollout.max_new_tokens)
            with self.timer("sleep"):  # free the KV cache and weights while the actor trains (no-op on CPU)
                p.engine.sleep()
            with self.timer("train"):
                stats = {**self.train_step(batch, advantages), **adv_stats}
            with self.timer("refit"):
                stats.update(self.refit().metrics())
            self.log(step, groups, train_groups, batch, stats, dict(faults))
            stop = p.stop is not None and p.stop.requested()  # SIGTERM on any rank: save this step, leave
            self.maybe_save(step, force=stop)
            groups, faults = [], Counter()
            if stop:
                break
        if step < cfg.run.steps and not self._out_of_time():  # paused (stop_after, SIGTERM): not over
            return self.summary(step, final=self.curve[-1][1])
        final = self.curve[-1][1] if self.last_eval_step == step else self.evaluate()
        if self.last_eval_step != step:
            p.logger.log(step, self.eval_scalars)
        self.save_hf("final")
        return self.summary(step, final=final)

    def summary(self, step: int, *, final: float) -> RunSummary:
        return RunSummary(steps=step, seconds=self._rl_seconds(), eval_seconds=self.eval_seconds,
                          warm_start_accuracy=self.warm, final_accuracy=final, accuracy_curve=list(self.curve),
                          set_curves={k: list(v) for k, v in self.set_curves.items()},
                          set_metrics=dict(self.set_metrics), save_seconds=self.save_seconds,
                          stopped_by_signal=self.parts.stop is not None and self.parts.stop.stopped)

    def train_step(self, batch: TrainBatch, token_adv: torch.Tensor) -> dict[str, float]:
        """Recompute old log-probs with the actor, then PPO-clip updates over the batch."""
        actor, cap = self.parts.actor, self.cfg.algorithm.tis_cap
        old_logprobs = actor.compute_logprobs(batch.tokens, mask=batch.response_mask)
        stats = _mismatch(old_logprobs, batch.rollout_logprobs, batch.response_mask)
        if cap:
            token_adv, tis_stats = tis_advantages(token_adv, old_logprobs, batch, cap=cap)
            stats.update(tis_stats)
        stats.update(actor.train_step(batch.tokens, batch.response_mask, old_logprobs, token_adv))
        return stats

    def refit(self) -> RefitStats:
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

    def evaluate(self) -> float:
        """Held-out evaluation per set: greedy accuracy, plus avg@k/pass@k when `eval.k` >= 1.

        Returns greedy accuracy over all held-out prompts (the accuracy-vs-time curve, from which the
        evaluation's own time is excluded). Every metric (`eval/accuracy`, `eval/<set>/...`) is kept in
        `eval_scalars` for the step's log line, and the full report goes to `eval/step_<policy version>.json`.
        """
        p = self.parts
        started = time.perf_counter()
        report = run_eval(p.engine, p.rewards, p.eval_records, self.cfg.eval, policy_version=p.actor.version,
                          replicas=p.replicas)
        self.eval_seconds += time.perf_counter() - started
        if p.dims.is_main:
            path = p.out_dir / "eval" / f"step_{p.actor.version:06d}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report.to_json(), indent=2))
        self.eval_scalars = report.scalars()
        now, acc = self._rl_seconds(), float(report.pooled_accuracy)
        self.curve.append((now, acc))
        for name, result in report.sets.items():
            self.set_metrics[name], value = result.headline
            self.set_curves.setdefault(name, []).append((now, value))
        return acc

    def save_hf(self, tag: str) -> None:
        started = time.perf_counter()
        self.parts.save_hf(tag)
        self.save_seconds += time.perf_counter() - started

    def log(self, step: int, groups: list[RolloutGroup], train_groups: list[RolloutGroup], batch: TrainBatch,
            stats: dict[str, float], scoring: dict[str, float]) -> None:
        cfg, logger = self.cfg, self.parts.logger
        times = self.timer.pop()
        scalars = {**rollout_metrics(groups, times), **train_metrics(batch, stats, times), **scoring,
                   **times, **self.parts.curriculum.metrics(), "time/rl_seconds": self._rl_seconds()}
        if (cfg.eval.every and step % cfg.eval.every == 0) or step == cfg.run.steps:
            self.evaluate()
            scalars.update(self.eval_scalars)
            self.last_eval_step = step
        if cfg.run.save_hf_every and step % cfg.run.save_hf_every == 0:
            self.save_hf(f"step_{step:06d}")
        logger.log_histogram(step, "rollout/pass_rate", [g.pass_rate for g in train_groups])
        logger.log(step, scalars)

    # --- checkpoint / resume (megatron_speed/checkpoint) ---------------------------------------------
    def state_dict(self, step: int) -> dict[str, Any]:
        """Everything the next steps depend on besides the actor's weights and optimizer."""
        p = self.parts
        return {"step": step, "actor_version": p.actor.version, "engine_calls": p.engine.calls,
                "curriculum": p.curriculum.state_dict(), "history": p.logger.history, "curve": self.curve,
                "warm_start_accuracy": self.warm, "last_eval_step": self.last_eval_step,
                "eval_seconds": self.eval_seconds, "save_seconds": self.save_seconds,
                "set_curves": self.set_curves, "set_metrics": self.set_metrics, "rl_seconds": self._rl_seconds()}

    def maybe_save(self, step: int, *, force: bool = False) -> None:
        """Every `run.save_every` steps and at a pause; `force` (a stop signal) saves even with saving off."""
        every = self.cfg.run.save_every
        if force or (every and (step % every == 0 or step == self.stop_step)):
            p, started = self.parts, time.perf_counter()
            save_checkpoint(checkpoints_root(p.out_dir), step, actor=p.actor, hf_src=p.hf_path,
                            trainer_state=self.state_dict(step), keep_last=self.cfg.run.keep_last,
                            layout={"world_size": p.dims.world_size, "tp": p.dims.tp, "pp": p.dims.pp,
                                    "cp": p.dims.cp})
            self.save_seconds += time.perf_counter() - started

    def resume(self, path: Path) -> int:
        """Restore actor, engine weights, curriculum, RNG streams and logs from `path`; returns its step."""
        p = self.parts
        state = load_checkpoint(path, actor=p.actor, world_size=p.dims.world_size)
        p.actor.version, p.engine.calls = state["actor_version"], state["engine_calls"]
        p.curriculum.load_state_dict(state["curriculum"])
        p.logger.history[:] = state["history"]
        self.curve, self.warm = list(state["curve"]), state["warm_start_accuracy"]
        self.last_eval_step, self.eval_seconds = state["last_eval_step"], state["eval_seconds"]
        self.save_seconds = state.get("save_seconds", 0.0)
        self.set_curves = {k: [tuple(p) for p in v] for k, v in state.get("set_curves", {}).items()}
        self.set_metrics = dict(state.get("set_metrics", {}))
        self.started = time.perf_counter() - state["rl_seconds"] - self.eval_seconds - self.save_seconds
        p.engine.sleep()  # the fresh engine holds the initial weights: refit in the usual order
        self.refit()
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


def tis_advantages(token_adv: torch.Tensor, old_logprobs: torch.Tensor, batch: TrainBatch, *,
                   cap: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Truncated importance sampling: the TIS weight on each token's policy-gradient loss, applied as
    the same weight on its advantage (identical loss and clip decisions, see `truncated_is_weights`),
    so the actor's loss needs no extra input."""
    weights, tis = truncated_is_weights(old_logprobs, batch.rollout_logprobs, batch.response_mask, cap=cap)
    n = float(batch.response_mask.sum().clamp(min=1))
    return token_adv * weights, {"mismatch/tis_clipped_fraction": float(tis["tis_clipped_tokens"]) / n,
                                 "mismatch/tis_weight_mean": float(tis["tis_weight_sum"]) / n}


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
