"""The Megatron actor: policy shards, log-probs, the PPO-clip train step, and HF-named weight export.

The loss runs through megatron-core's forward-backward schedule so micro-batching and pipeline
parallelism come from the library. The loss function returns a token SUM and the number of tokens;
with `calculate_per_token_loss` megatron divides the gradients by the token count summed over all
micro-batches and data-parallel ranks, so "token-mean" is the true mean over the mini-batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from megatron_speed.actor.cpu_support import cpu_megatron
from megatron_speed.actor.logprobs import token_entropy, token_logprobs
from megatron_speed.actor.model import build_gpt_model
from megatron_speed.actor.optimizer import build_optimizer
from megatron_speed.algorithms import aggregate_loss, kl_penalty, policy_objective, ppo_clip_token_loss
from megatron_speed.bridge import mapping_for
from megatron_speed.bridge.weights import export_hf_weights, load_hf_weights
from megatron_speed.config.schema import AlgorithmConfig, ModelConfig, OptimConfig


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm is not finite; the step is refused before any weight changes."""


@dataclass(frozen=True)
class MicroBatch:
    tokens: torch.Tensor  # [b, S]
    mask: torch.Tensor  # [b, S-1]
    old_logprobs: torch.Tensor  # [b, S-1]
    advantages: torch.Tensor  # [b, S-1]
    ref_logprobs: torch.Tensor | None = None  # [b, S-1], only with a KL penalty


def _split(size: int, tokens: torch.Tensor, *per_token: torch.Tensor | None) -> list[MicroBatch]:
    """Cut row-aligned tensors into micro-batches of `size` rows (None stays None)."""
    return [MicroBatch(tokens[i:i + size], *(t[i:i + size] if t is not None else None for t in per_token))
            for i in range(0, tokens.shape[0], size)]


class MegatronActor:
    """Owns the model chunk, its optimizer and LR schedule on this rank."""

    def __init__(self, hf_path: str | Path, *, model_cfg: ModelConfig, optim_cfg: OptimConfig,
                 algorithm_cfg: AlgorithmConfig, temperature: float, horizon: int, total_steps: int,
                 tp: int = 1, pp: int = 1) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from transformers import AutoConfig

        self.hf_path = Path(hf_path)
        self.hf_config = AutoConfig.from_pretrained(self.hf_path)
        self.mapping = mapping_for(self.hf_config)
        self.optim_cfg, self.algorithm_cfg, self.temperature = optim_cfg, algorithm_cfg, temperature
        self.horizon = horizon  # longest possible response, for seq-mean-token-sum-norm
        dtype = torch.bfloat16 if model_cfg.params_dtype == "bfloat16" else torch.float32
        with cpu_megatron():
            model = build_gpt_model(self.hf_config, params_dtype=dtype, tp=tp, pp=pp)
            load_hf_weights(model, self.mapping, self.hf_path)
            ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                       use_distributed_optimizer=False,
                                                       check_for_nan_in_grad=False)
            self.model = DistributedDataParallel(model.config, ddp_config, model)
            model.config.finalize_model_grads_func = finalize_model_grads
            model.config.no_sync_func = self.model.no_sync
            self.optimizer, self.scheduler = build_optimizer(self.model, optim_cfg, total_steps=total_steps,
                                                             bf16=dtype == torch.bfloat16)
            # The reference policy (frozen initial weights) exists only when a KL penalty needs it.
            self.reference = None
            if algorithm_cfg.kl_coef > 0:
                self.reference = build_gpt_model(self.hf_config, params_dtype=dtype, tp=tp, pp=pp)
                load_hf_weights(self.reference, self.mapping, self.hf_path)
                self.reference.config.finalize_model_grads_func = None
                self.reference.requires_grad_(False)
        self.version = 0

    @property
    def module(self) -> torch.nn.Module:
        return self.model.module

    # --- forward/backward through megatron's schedule -------------------------------------------
    def _forward_step(self, data_iterator: Iterator[MicroBatch], model: Any, *, train: bool) -> Any:
        mb = next(data_iterator)
        positions = torch.arange(mb.tokens.shape[1], device=mb.tokens.device).unsqueeze(0).expand_as(mb.tokens)
        logits = model(mb.tokens, positions, attention_mask=None)
        return logits, partial(self._loss, mb, train)

    def _loss(self, mb: MicroBatch, train: bool, logits: torch.Tensor) -> tuple[Any, ...]:
        """Returns (numerator, denominator, stats): megatron sums both over micro-batches and ranks
        and divides the gradients by the global denominator (see algorithms/aggregation.py)."""
        logp = token_logprobs(logits, mb.tokens, temperature=self.temperature)
        if not train:
            return logp.sum() * 0, mb.mask.sum().to(torch.int), {"logprobs": logp.detach()}
        cfg = self.algorithm_cfg
        per_token, stats = ppo_clip_token_loss(logp, mb.old_logprobs, mb.advantages, mb.mask,
                                               clip_low=cfg.clip_low, clip_high=cfg.clip_high, clip_c=cfg.clip_c)
        kl = kl_penalty(logp, mb.ref_logprobs, mb.mask, cfg.kl_kind) if mb.ref_logprobs is not None else None
        entropy = token_entropy(logits, temperature=self.temperature) if cfg.entropy_coef else None
        objective = policy_objective(per_token, kl=kl, kl_coef=cfg.kl_coef, entropy=entropy,
                                     entropy_coef=cfg.entropy_coef)
        numerator, denominator = aggregate_loss(objective, mb.mask, aggregation=cfg.loss_aggregation,
                                                horizon=self.horizon)
        if kl is not None:
            stats["kl_sum"] = kl.detach().sum()
        if entropy is not None:
            stats["entropy_sum"] = (entropy.detach() * mb.mask).sum()
        return numerator, denominator.to(torch.int), {"loss_num": numerator.detach(),
                                                      "loss_den": denominator.detach().float(), **stats}

    def _run_schedule(self, micro_batches: list[MicroBatch], *, train: bool,
                      model: torch.nn.Module | None = None) -> list[dict[str, Any]]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        return get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, train=train),
            data_iterator=iter(micro_batches), model=[model or self.model], num_microbatches=len(micro_batches),
            seq_length=micro_batches[0].tokens.shape[1], micro_batch_size=micro_batches[0].tokens.shape[0],
            forward_only=not train)

    @torch.no_grad()
    def compute_logprobs(self, tokens: torch.Tensor, *, reference: bool = False) -> torch.Tensor:
        """Log-probs [N, S-1] of each next token under the current (or the reference) weights."""
        zeros = torch.zeros(tokens.shape[0], tokens.shape[1] - 1, device=tokens.device)
        mbs = _split(self.optim_cfg.micro_batch_size, tokens, zeros, zeros, zeros)
        model = self.reference if reference else self.model
        model.eval()
        with cpu_megatron():
            out = self._run_schedule(mbs, train=False, model=model)
        return torch.cat([o["logprobs"] for o in out], dim=0)

    def train_step(self, tokens: torch.Tensor, mask: torch.Tensor, old_logprobs: torch.Tensor,
                   token_advantages: torch.Tensor) -> dict[str, float]:
        """One RL step: optimizer updates over mini-batches of `optim.mini_batch_size` trajectories."""
        stats: dict[str, float] = {}
        size = self.optim_cfg.mini_batch_size
        ref = self.compute_logprobs(tokens, reference=True) if self.reference is not None else None
        self.model.train()
        for start in range(0, tokens.shape[0], size):
            sl = slice(start, start + size)
            mbs = _split(self.optim_cfg.micro_batch_size, tokens[sl], mask[sl], old_logprobs[sl],
                         token_advantages[sl], ref[sl] if ref is not None else None)
            for key, value in self._optimizer_step(mbs).items():
                stats[key] = stats.get(key, 0.0) + value
        updates = math.ceil(tokens.shape[0] / size)
        self.version += 1
        return {k: (v / updates if k in ("loss", "grad_norm", "lr") else v) for k, v in stats.items()}

    def _optimizer_step(self, mbs: list[MicroBatch]) -> dict[str, float]:
        with cpu_megatron():
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
            out = self._run_schedule(mbs, train=True)
            sums = {k: float(sum(o[k] for o in out)) for k in out[0]}
            if not math.isfinite(sums["loss_num"]):
                raise TrainingDiverged(f"loss is {sums['loss_num']} at actor step {self.version}: refusing the "
                                       "update; lower optim.lr or check the rewards for NaN")
            _, grad_norm, _ = self.optimizer.step()
            if grad_norm is not None and not math.isfinite(grad_norm):
                raise TrainingDiverged(f"gradient norm is {grad_norm} at actor step {self.version}")
            self.scheduler.step(increment=1)
        denominator = max(sums.pop("loss_den"), 1.0)
        return {"loss": sums.pop("loss_num") / denominator, "grad_norm": float(grad_norm or 0.0),
                "lr": self.optimizer.param_groups[0]["lr"], **sums}

    # --- weights out ------------------------------------------------------------------------------
    def export_hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream the policy as HF-named full tensors (collective: every rank iterates it to the end)."""
        return export_hf_weights(self.model, self.mapping)
