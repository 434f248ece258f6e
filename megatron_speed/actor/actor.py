"""The Megatron actor: policy shards, log-probs, the PPO-clip train step, and HF-named weight export.

The loss runs through megatron-core's forward-backward schedule so micro-batching and pipeline
parallelism (also interleaved, with virtual stages) come from the library. The loss function returns
a token SUM and the number of tokens; with `calculate_per_token_loss` megatron divides the gradients
by the token count summed over all micro-batches and data-parallel ranks, so "token-mean" is the true
mean over the mini-batch.

SPMD contract: `compute_logprobs` and `train_step` receive the FULL batch on every rank. A rank keeps
its contiguous share of rows for its data-parallel index, and results come back full and identical on
every rank: log-probs exist only on the last pipeline stage, so they are broadcast over the pipeline
group and then all-gathered over data parallelism; loss statistics are summed over micro-batches and
data-parallel ranks on the last stage and broadcast from there.

Sequence packing (`optim.pack_sequences`, actor/packing.py) replaces the padded rows: every rank bins
the whole (mini-)batch for all data-parallel ranks, keeps its own packed micro-batches, and with
context parallelism its chunks of each sequence; per-token outputs come back at (row, column) of the
batch and are summed over data- and context-parallel ranks (each position has exactly one holder).

With PP > 1 the model config sets `variable_seq_lengths`: the stages exchange each activation's shape
before the activation, so micro-batches may differ in rows (the last, smaller one) and in length
(dynamic batching) — checked on CPU with PP=2.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_speed.actor.batching import (
    MicroBatch,
    cut,
    pad_to_common_shape,
    plan,
    row_lengths,
    scatter_rows,
    split_rows,
)
from megatron_speed.actor.logprobs import position_logprobs, token_entropy, token_logprobs
from megatron_speed.actor.lora import adapters_disabled, apply_lora
from megatron_speed.actor.model import build_gpt_model
from megatron_speed.actor.moe import check_trainable_layout, reset_aux_loss_scale
from megatron_speed.actor.optimizer import build_optimizer
from megatron_speed.actor.packing import PackedMicroBatch, balanced_bins, build_packed, padded_length, scatter_packed
from megatron_speed.actor.router_metrics import RouterMetrics
from megatron_speed.algorithms import aggregate_loss, kl_penalty, policy_objective, ppo_clip_token_loss
from megatron_speed.algorithms.aggregation import aggregate_segments
from megatron_speed.bridge import mapping_for
from megatron_speed.bridge.lora import export_adapter_weights, peft_adapter_config
from megatron_speed.bridge.weights import bare_chunks, export_hf_weights, load_hf_weights
from megatron_speed.config.base import ConfigError
from megatron_speed.config.schema import AlgorithmConfig, ModelConfig, OptimConfig, ParallelConfig
from megatron_speed.parallel.cpu_support import cpu_megatron

_split = split_rows  # kept for callers of the fixed-size split (tests, workers)
__all__ = ["MegatronActor", "MicroBatch", "TrainingDiverged"]


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm is not finite; the step is refused before any weight changes."""


def _ps() -> Any:
    from megatron.core import parallel_state

    return parallel_state


def _check_layout(hf_config: Any, pp: int, vpp: int, first: int | None = None,
                  last: int | None = None) -> tuple[int, ...]:
    """Layers on each pipeline stage; ConfigError naming the parallel.* key when the sizes do not fit."""
    parallel = ParallelConfig(pipeline_parallel_size=pp, virtual_pipeline_parallel_size=vpp,
                              num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last)
    return parallel.layers_per_stage(hf_config.num_hidden_layers)


def _real_tokens(mb: MicroBatch | PackedMicroBatch) -> int:
    """Positions of a micro-batch that hold a token the loss needs (the rest is padding)."""
    if isinstance(mb, PackedMicroBatch):
        return mb.real_tokens
    cols = torch.arange(1, mb.mask.shape[1] + 1, device=mb.mask.device)
    last = torch.where(mb.mask > 0, cols, torch.zeros_like(cols)).max(dim=1).values
    real = mb.rows >= 0 if mb.rows is not None else torch.ones_like(last, dtype=torch.bool)
    return int(torch.where(real, (last + 1).clamp(min=2), torch.zeros_like(last)).sum())


class MegatronActor:
    """Owns the model chunk(s), the optimizer and the LR schedule on this rank."""

    def __init__(self, hf_path: str | Path, *, model_cfg: ModelConfig, optim_cfg: OptimConfig,
                 algorithm_cfg: AlgorithmConfig, temperature: float, horizon: int, total_steps: int,
                 tp: int = 1, pp: int = 1, first_stage_layers: int | None = None,
                 last_stage_layers: int | None = None) -> None:
        from transformers import AutoConfig

        self.hf_path = Path(hf_path)
        self.hf_config = AutoConfig.from_pretrained(self.hf_path)
        self.mapping = mapping_for(self.hf_config)
        self.model_cfg, self.optim_cfg, self.algorithm_cfg = model_cfg, optim_cfg, algorithm_cfg
        self.temperature = temperature
        self.horizon = horizon  # longest possible response, for seq-mean-token-sum-norm
        self.tp, self.pp = tp, pp
        self.vpp = _ps().get_virtual_pipeline_model_parallel_world_size() or 1
        self.stage_layers = (first_stage_layers, last_stage_layers)  # megatron's uneven split; None = even
        self.layers_per_stage = _check_layout(self.hf_config, pp, self.vpp, *self.stage_layers)
        self.cp = _ps().get_context_parallel_world_size()
        if self.cp > 1 and not optim_cfg.pack_sequences:
            raise ConfigError("parallel.context_parallel_size", self.cp, "needs packed sequences",
                              "set optim.pack_sequences=true (with optim.micro_batch_tokens)")
        check_trainable_layout(self.hf_config, tp)
        self.dtype = torch.bfloat16 if model_cfg.params_dtype == "bfloat16" else torch.float32
        with cpu_megatron():
            self.chunks = self._wrap_ddp(self._build_chunks(lora=self.lora.enabled))
            self.optimizer, self.scheduler = build_optimizer(self.chunks, optim_cfg, total_steps=total_steps,
                                                             bf16=self.dtype == torch.bfloat16)
            # The reference policy (frozen initial weights) exists only when a KL penalty needs it;
            # with LoRA it is the base model itself, run with the adapters switched off.
            self.reference = None
            if algorithm_cfg.kl_coef > 0 and not self.lora.enabled:
                self.reference = self._build_chunks()
                for chunk in self.reference:
                    chunk.config.finalize_model_grads_func = None
                    chunk.requires_grad_(False)
        # MoE: per-layer expert load, dropped tokens and the aux loss of each train step (router_metrics.py).
        self.router_metrics = (RouterMetrics(bare_chunks(self.chunks), capacity=model_cfg.moe_capacity_factor > 0)
                               if getattr(self.module.config, "num_moe_experts", None) else None)
        self.version = 0

    @property
    def lora(self) -> Any:
        return self.model_cfg.lora

    def _build_chunks(self, *, lora: bool = False) -> list[torch.nn.Module]:
        """This stage's model chunk(s) (VPP: one per virtual stage), loaded from the HF checkpoint;
        with `model.lora` the base weights are frozen and adapters attached (actor/lora.py)."""
        kwargs = dict(params_dtype=self.dtype, tp=self.tp, pp=self.pp,
                      attention_backend=self.model_cfg.attention_backend, recompute=self.model_cfg.recompute,
                      first_stage_layers=self.stage_layers[0], last_stage_layers=self.stage_layers[1],
                      moe_aux_loss_coef=self.model_cfg.moe_aux_loss_coef,
                      moe_capacity_factor=self.model_cfg.moe_capacity_factor)
        if self.vpp == 1:
            chunks = [build_gpt_model(self.hf_config, **kwargs)]
        else:
            chunks = [build_gpt_model(self.hf_config, vp_stage=i, **kwargs) for i in range(self.vpp)]
        for chunk in chunks:
            # Stages exchange activation shapes first, so micro-batches may vary in rows and length.
            # Not with VPP: megatron always batches that shape exchange, which gloo mismatches when
            # the previous and next stage are one rank (PP=2); micro-batches are padded instead.
            chunk.config.variable_seq_lengths = self.pp > 1 and self.vpp == 1
            # gloo matches a pair's messages in posting order, so batched p2p mixes activations and
            # gradients when the previous and next stage are the same rank (PP=2 with VPP); megatron's
            # unbatched path puts the two directions on different groups.
            chunk.config.batch_p2p_comm = torch.cuda.is_available()
        load_hf_weights(chunks, self.mapping, self.hf_path)
        if lora:
            for chunk in chunks:
                apply_lora(chunk, self.lora, self.hf_config, dtype=self.dtype)
        if self.dtype == torch.bfloat16:
            from megatron.core.transformer.module import Float16Module

            # bf16 params without TE/apex: Float16Module casts the first stage's float inputs to bf16
            # and the last stage's logits back to float32, as megatron's own training loop does.
            chunks = [Float16Module(chunk.config, chunk) for chunk in chunks]
        return chunks

    def _wrap_ddp(self, chunks: list[torch.nn.Module]) -> list[Any]:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads

        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, check_for_nan_in_grad=False,
            use_distributed_optimizer=self.optim_cfg.use_distributed_optimizer)
        wrapped = [DistributedDataParallel(c.config, ddp_config, c, disable_bucketing=i > 0)
                   for i, c in enumerate(chunks)]
        config = chunks[0].config  # the schedule reads the first chunk's config
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = [w.no_sync for w in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
        return wrapped

    @property
    def layout(self) -> dict[str, Any]:
        """The model-parallel layout, as a checkpoint's meta.json records it."""
        return {"tp": self.tp, "pp": self.pp, "vpp": self.vpp, "layers_per_stage": list(self.layers_per_stage),
                "num_layers_in_first_pipeline_stage": self.stage_layers[0],
                "num_layers_in_last_pipeline_stage": self.stage_layers[1]}

    @property
    def model(self) -> Any:
        """The DDP-wrapped first chunk (the only one unless virtual pipeline stages are on)."""
        return self.chunks[0]

    @property
    def module(self) -> torch.nn.Module:
        return self.chunks[0].module

    # --- rows: data-parallel share and micro-batches ----------------------------------------------
    def _local_rows(self, rows: int) -> slice:
        """This data-parallel rank's contiguous, equal share of `rows` rows."""
        ps = _ps()
        size, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        if rows % size:
            raise ValueError(f"a batch of {rows} rows does not split evenly over {size} data-parallel ranks; make "
                             "the rollout batch and optim.mini_batch_size multiples of the data-parallel size")
        share = rows // size
        return slice(rank * share, (rank + 1) * share)

    def _packed_micro_batches(self, tokens: torch.Tensor, length_mask: torch.Tensor | None,
                              *per_token: torch.Tensor | None) -> list[PackedMicroBatch]:
        """This rank's packed micro-batches of ALL of `tokens`' rows (binned for every data-parallel
        rank alike; with CP, this rank's chunks). Per-token tensors: mask, old, advantages[, ref]."""
        ps = _ps()
        lengths = row_lengths(length_mask, tokens.shape[1], tokens.shape[0])
        padded = [padded_length(n, self.cp) for n in lengths]
        bins = balanced_bins(padded, capacity=self.optim_cfg.micro_batch_tokens,
                             ranks=ps.get_data_parallel_world_size(),
                             min_per_rank=self.pp if self.vpp > 1 else 1)[ps.get_data_parallel_rank()]
        # The interleaved pipeline on gloo needs one activation shape: pad every row to the longest.
        width = max(sum(padded[i] for i in group) for group in bins) if self.vpp > 1 else None
        cp_rank = ps.get_context_parallel_rank()
        return [build_packed(group, lengths, tokens, *per_token, cp=self.cp, cp_rank=cp_rank, width=width)
                for group in bins]

    def _micro_batches(self, tokens: torch.Tensor, length_mask: torch.Tensor | None,
                       *per_token: torch.Tensor | None) -> list[MicroBatch]:
        """Fixed or token-budget micro-batches (see batching.py); `length_mask` decides row lengths."""
        cfg = self.optim_cfg
        lengths = row_lengths(length_mask, tokens.shape[1], tokens.shape[0])
        groups = plan(lengths, rows_per_micro_batch=cfg.micro_batch_size, token_budget=cfg.micro_batch_tokens,
                      min_micro_batches=self.pp if self.vpp > 1 else 1)
        mbs = cut(groups, lengths, tokens, *per_token, trim=cfg.micro_batch_tokens > 0)
        return pad_to_common_shape(mbs) if self.vpp > 1 else mbs

    # --- forward/backward through megatron's schedule -------------------------------------------
    def _forward_step(self, data_iterator: Iterator[MicroBatch], model: Any, *, train: bool) -> Any:
        mb = next(data_iterator)
        if isinstance(mb, PackedMicroBatch):
            logits = model(mb.tokens, mb.positions, attention_mask=None, packed_seq_params=mb.packed_seq_params())
            return logits, partial(self._loss, mb, train)
        positions = torch.arange(mb.tokens.shape[1], device=mb.tokens.device).unsqueeze(0).expand_as(mb.tokens)
        logits = model(mb.tokens, positions, attention_mask=None)
        return logits, partial(self._loss, mb, train)

    def _loss(self, mb: MicroBatch | PackedMicroBatch, train: bool, logits: torch.Tensor) -> tuple[Any, ...]:
        """Returns (numerator, denominator, stats): megatron sums both over micro-batches and ranks
        and divides the gradients by the global denominator (see algorithms/aggregation.py)."""
        packed, cfg = isinstance(mb, PackedMicroBatch), self.algorithm_cfg
        entropy = None
        if train and cfg.entropy_coef:  # before the cross entropy, which may modify `logits` in place
            entropy = token_entropy(logits, temperature=self.temperature, shift=not packed)
        if packed:
            logp = position_logprobs(logits, mb.labels, temperature=self.temperature)
        else:
            logp = token_logprobs(logits, mb.tokens, temperature=self.temperature)
        if not train:
            return logp.sum() * 0, mb.mask.sum().to(torch.int), {"logprobs": logp.detach()}
        per_token, stats = ppo_clip_token_loss(logp, mb.old_logprobs, mb.advantages, mb.mask,
                                               clip_low=cfg.clip_low, clip_high=cfg.clip_high, clip_c=cfg.clip_c)
        kl = kl_penalty(logp, mb.ref_logprobs, mb.mask, cfg.kl_kind) if mb.ref_logprobs is not None else None
        objective = policy_objective(per_token, kl=kl, kl_coef=cfg.kl_coef, entropy=entropy,
                                     entropy_coef=cfg.entropy_coef)
        if packed:
            numerator, denominator = aggregate_segments(
                objective, mb.mask, mb.segment, segment_tokens=mb.segment_tokens,
                segment_counted=mb.segment_counted, aggregation=cfg.loss_aggregation, horizon=self.horizon)
        else:
            numerator, denominator = aggregate_loss(objective, mb.mask, aggregation=cfg.loss_aggregation,
                                                    horizon=self.horizon)
        device = mb.tokens.device  # the stats are stacked with the loss's own, on its device
        stats["computed_tokens"] = torch.tensor(float(mb.tokens.numel()), device=device)
        stats["real_tokens"] = torch.tensor(float(_real_tokens(mb)), device=device)
        if kl is not None:
            stats["kl_sum"] = kl.detach().sum()
        if entropy is not None:
            stats["entropy_sum"] = (entropy.detach() * mb.mask).sum()
        return numerator, denominator.to(torch.int), {"loss_num": numerator.detach(),
                                                      "loss_den": denominator.detach().float(), **stats}

    def _run_schedule(self, micro_batches: list[MicroBatch], *, train: bool,
                      model: Any = None) -> list[dict[str, Any]]:
        """Megatron's schedule over this rank's micro-batches; the outputs exist on the last stage only."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        chunks = model if isinstance(model, list) else [model] if model is not None else self.chunks
        data = iter(micro_batches) if len(chunks) == 1 else [iter(micro_batches) for _ in chunks]
        if self.router_metrics is not None:
            reset_aux_loss_scale()  # the schedule sets it afresh (actor/moe.py)
        return get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, train=train), data_iterator=data, model=chunks,
            num_microbatches=len(micro_batches), seq_length=max(mb.tokens.shape[1] for mb in micro_batches),
            micro_batch_size=max(mb.tokens.shape[0] for mb in micro_batches), forward_only=not train)

    @torch.no_grad()
    def compute_logprobs(self, tokens: torch.Tensor, *, reference: bool = False,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probs [N, S-1] of each next token under the current (or the reference) weights.

        `mask` (optional, [N, S-1]) lets dynamic batching trim rows after their last masked token; the
        log-probs past it are then 0."""
        # The reference policy: its own frozen copy, or with LoRA the base model (adapters switched off).
        chunks = self.reference if reference and self.reference is not None else self.chunks
        for chunk in chunks:
            chunk.eval()
        base_only = adapters_disabled(chunks) if reference and self.reference is None else contextlib.nullcontext()
        if self.optim_cfg.pack_sequences:
            with base_only:
                return self._packed_logprobs(tokens, mask, chunks)
        ps = _ps()
        rows = self._local_rows(tokens.shape[0])
        local_mask = mask[rows] if mask is not None else None
        zeros = torch.zeros(rows.stop - rows.start, tokens.shape[1] - 1, device=tokens.device)
        mbs = self._micro_batches(tokens[rows], local_mask, zeros, zeros, zeros)
        with cpu_megatron(), base_only:
            out = self._run_schedule(mbs, train=False, model=chunks)
        local = scatter_rows([(mb.rows, o["logprobs"]) for mb, o in zip(mbs, out)], zeros)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(local, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        if ps.get_data_parallel_world_size() == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(ps.get_data_parallel_world_size())]
        dist.all_gather(parts, local, group=ps.get_data_parallel_group())
        return torch.cat(parts, dim=0)

    def _packed_logprobs(self, tokens: torch.Tensor, mask: torch.Tensor | None, chunks: list[Any]) -> torch.Tensor:
        """`compute_logprobs` over packed micro-batches: each (row, column) is computed on exactly one
        data/context-parallel rank, so the last stage's scatter summed over those ranks is the result."""
        ps = _ps()
        full = torch.zeros(tokens.shape[0], tokens.shape[1] - 1, device=tokens.device)
        mbs = self._packed_micro_batches(tokens, mask, mask if mask is not None else full)
        with cpu_megatron():
            out = self._run_schedule(mbs, train=False, model=chunks)
        if ps.is_pipeline_last_stage():
            scatter_packed([(mb, o["logprobs"]) for mb, o in zip(mbs, out)], full)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(full, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        if ps.get_data_parallel_world_size(with_context_parallel=True) > 1:
            dist.all_reduce(full, group=ps.get_data_parallel_group(with_context_parallel=True))
        return full

    def _train_micro_batches(self, rows: slice, tokens: torch.Tensor, mask: torch.Tensor, *per_token: Any) -> list[Any]:
        """This rank's micro-batches of mini-batch `rows`: packed from all its rows, or padded from this
        data-parallel rank's share."""
        if self.optim_cfg.pack_sequences:
            return self._packed_micro_batches(tokens[rows], mask[rows], mask[rows],
                                              *(t[rows] if t is not None else None for t in per_token))
        local = self._local_rows(rows.stop - rows.start)
        mine = slice(rows.start + local.start, rows.start + local.stop)
        return self._micro_batches(tokens[mine], mask[mine], mask[mine],
                                   *(t[mine] if t is not None else None for t in per_token))

    def train_step(self, tokens: torch.Tensor, mask: torch.Tensor, old_logprobs: torch.Tensor,
                   token_advantages: torch.Tensor) -> dict[str, float]:
        """One RL step: optimizer updates over mini-batches of `optim.mini_batch_size` trajectories
        (of the full batch; each data-parallel rank trains on its share of every mini-batch). The LR
        schedule advances after every update or once at the end, as `optim.lr_schedule_unit` says;
        the returned "lr" is the mean LR the step's updates used, "optimizer_updates" their count."""
        stats: dict[str, float] = {}
        size = self.optim_cfg.mini_batch_size
        ref = self.compute_logprobs(tokens, reference=True, mask=mask) if self.algorithm_cfg.kl_coef > 0 else None
        for chunk in self.chunks:
            chunk.train()
        for start in range(0, tokens.shape[0], size):
            rows = slice(start, min(start + size, tokens.shape[0]))
            mbs = self._train_micro_batches(rows, tokens, mask, old_logprobs, token_advantages, ref)
            for key, value in self._optimizer_step(mbs).items():
                stats[key] = stats.get(key, 0.0) + value
        updates = math.ceil(tokens.shape[0] / size)
        if self.optim_cfg.lr_schedule_unit == "rl_step":
            self.scheduler.step(increment=1)
        self.version += 1
        # Share of the computed positions (all micro-batches, ranks and updates) that were padding.
        computed, real = stats.pop("computed_tokens"), stats.pop("real_tokens")
        stats["actor/padding_fraction"] = 1.0 - real / max(computed, 1.0)
        stats["optimizer_updates"] = float(updates)
        routing = self.router_metrics.collect() if self.router_metrics is not None else {}
        return {**{k: (v / updates if k in ("loss", "grad_norm", "lr") else v) for k, v in stats.items()}, **routing}

    def _global_sums(self, out: list[dict[str, Any]]) -> dict[str, float]:
        """Loss statistics summed over micro-batches (last stage) and data- and context-parallel ranks,
        then broadcast over the pipeline group, so every rank returns the same numbers."""
        ps = _ps()
        sums: dict[str, float] | None = None
        if ps.is_pipeline_last_stage():
            keys = sorted(out[0])
            values = torch.stack([sum(o[k].detach().float() for o in out) for k in keys])
            if ps.get_data_parallel_world_size(with_context_parallel=True) > 1:
                dist.all_reduce(values, group=ps.get_data_parallel_group(with_context_parallel=True))
            sums = dict(zip(keys, values.tolist()))
        if ps.get_pipeline_model_parallel_world_size() > 1:
            box = [sums]
            dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                                       group=ps.get_pipeline_model_parallel_group())
            sums = box[0]
        assert sums is not None
        return sums

    def _optimizer_step(self, mbs: list[MicroBatch]) -> dict[str, float]:
        with cpu_megatron():
            for chunk in self.chunks:
                chunk.zero_grad_buffer()
            self.optimizer.zero_grad()
            sums = self._global_sums(self._run_schedule(mbs, train=True))
            if not math.isfinite(sums["loss_num"]):  # global, so every rank refuses together
                raise TrainingDiverged(f"loss is {sums['loss_num']} at actor step {self.version}: refusing the "
                                       "update; lower optim.lr or check the rewards for NaN")
            _, grad_norm, _ = self.optimizer.step()
            if grad_norm is not None and not math.isfinite(grad_norm):
                raise TrainingDiverged(f"gradient norm is {grad_norm} at actor step {self.version}")
            if self.optim_cfg.lr_schedule_unit == "optimizer_step":
                self.scheduler.step(increment=1)
        denominator = max(sums.pop("loss_den"), 1.0)
        return {"loss": sums.pop("loss_num") / denominator, "grad_norm": float(grad_norm or 0.0),
                "lr": self.optimizer.param_groups[0]["lr"], **sums}

    # --- weights out ------------------------------------------------------------------------------
    def export_hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream the policy as HF-named full tensors (collective: every rank iterates it to the end);
        with LoRA the weights are merged (W + scaling * B A)."""
        return export_hf_weights(self.chunks, self.mapping)

    def export_adapter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream the LoRA adapters as PEFT-named full tensors (collective, like `export_hf_weights`)."""
        return export_adapter_weights(self.chunks)

    def adapter_config(self) -> dict[str, Any]:
        """The PEFT `adapter_config.json` of this actor's adapters (base model: the HF folder it loaded)."""
        lora = self.lora
        return peft_adapter_config(base_model=str(self.hf_path.resolve()), rank=lora.rank, alpha=lora.alpha,
                                   dropout=lora.dropout, targets=lora.targets)

    def checkpoint_meta(self) -> dict[str, Any]:
        """What a checkpoint must record beside the shards: with LoRA, the adapter shape and the base
        model the adapters apply to (the checkpoint holds adapters and their optimizer state only)."""
        if not self.lora.enabled:
            return {}
        lora = self.lora
        return {"base_model": str(self.hf_path.resolve()), "lora": {"rank": lora.rank, "alpha": lora.alpha,
                                                                     "dropout": lora.dropout,
                                                                     "targets": list(lora.targets)}}
