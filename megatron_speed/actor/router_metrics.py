"""What the MoE routers did during a train step: expert load balance, dropped tokens, aux loss.

Forward hooks on megatron's `TopKRouter`s count, per layer and expert, the tokens routed there in
training forwards (after capacity dropping, when a capacity factor is set). `collect()` sums the
counts over data- and context-parallel ranks (expert-parallel ranks are data-parallel ranks for the
router, which sees its own tokens; each context-parallel rank routes its own chunks of the
sequences) and pipeline stages, so every rank reports the same global numbers:

* `moe/load_imbalance`: max over experts / mean over experts of the tokens routed, per MoE layer,
  averaged over layers (1.0 = perfectly balanced; E / top-k = every token to the same experts);
  `moe/load_imbalance_max` is the worst layer, `moe/layer_{i}/load_imbalance` each layer;
* `moe/dropped_token_frac`: the share of token-expert assignments capacity dropped (capacity on only);
* `moe/aux_loss`: megatron's load-balancing loss (before its coefficient) averaged over the step's
  micro-batches and the MoE layers, read from megatron's aux-loss tracker and reset.

Activation recomputation runs the router twice; both the counts and their totals double, so the
ratios are unchanged. Tensor-parallel ranks route the same tokens and are not summed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

AUX_LOSS = "load_balancing_loss"  # megatron's tracker name for the "aux_loss" balancing type


class RouterMetrics:
    """Per-layer routing counts over one train step, for the routers of `chunks` (bare GPTModels)."""

    def __init__(self, chunks: list[torch.nn.Module], *, capacity: bool) -> None:
        from megatron.core.transformer.moe.router import TopKRouter

        config = chunks[0].config
        self.num_layers, self.experts, self.topk = config.num_layers, config.num_moe_experts, config.moe_router_topk
        self.capacity = capacity
        self.counts = torch.zeros(self.num_layers, self.experts, dtype=torch.float64)
        self.assignments = torch.zeros(self.num_layers, dtype=torch.float64)  # tokens x top-k, before dropping
        self.calls = torch.zeros(self.num_layers, dtype=torch.float64)
        self.routers = [m for chunk in chunks for m in chunk.modules() if isinstance(m, TopKRouter)]
        self.handles = [r.register_forward_hook(self._record) for r in self.routers]
        # megatron's tracker is process-global and sized by the first model that used it: start afresh.
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        get_moe_layer_wise_logging_tracker().pop(AUX_LOSS, None)

    def _record(self, router: Any, inputs: Any, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        if not (router.training and torch.is_grad_enabled()):
            return  # log-prob passes and the reference policy are not training traffic
        layer = router.layer_number - 1  # megatron numbers layers globally from 1
        routing_map = output[1].detach()
        self.counts[layer] += routing_map.sum(dim=0).to(device="cpu", dtype=torch.float64)
        self.assignments[layer] += routing_map.shape[0] * self.topk
        self.calls[layer] += 1

    @staticmethod
    def _token_ranks() -> int:
        """Ranks that route different tokens of one pipeline stage: data x context parallel."""
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_world_size(with_context_parallel=True)

    def _reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks that route different tokens (DP x CP) and over pipeline stages."""
        from megatron.core import parallel_state as ps

        if self._token_ranks() > 1:
            dist.all_reduce(tensor, group=ps.get_data_parallel_group(with_context_parallel=True))
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(tensor, group=ps.get_pipeline_model_parallel_group())
        return tensor

    def collect(self) -> dict[str, float]:
        """The step's router metrics (collective over DP x CP and PP: every rank must call it), then reset."""
        packed = self._reduce(torch.cat([self.counts.flatten(), self.assignments, self.calls]))
        counts = packed[: self.counts.numel()].view_as(self.counts)
        assignments = packed[self.counts.numel(): self.counts.numel() + self.num_layers]
        calls = packed[-self.num_layers:]
        layers = [i for i in range(self.num_layers) if assignments[i] > 0]
        out: dict[str, float] = {}
        aux = self._aux_loss(calls)
        if aux is not None:
            out["moe/aux_loss"] = aux
        if layers:
            imbalance = {i: float(counts[i].max() / counts[i].mean().clamp_min(1e-12)) for i in layers}
            out["moe/load_imbalance"] = sum(imbalance.values()) / len(layers)
            out["moe/load_imbalance_max"] = max(imbalance.values())
            out.update({f"moe/layer_{i}/load_imbalance": v for i, v in imbalance.items()})
            if self.capacity:
                routed, total = counts[layers].sum(), assignments[layers].sum()
                out["moe/dropped_token_frac"] = float(1 - routed / total)
        self.counts.zero_()
        self.assignments.zero_()
        self.calls.zero_()
        return out

    def _aux_loss(self, calls: torch.Tensor) -> float | None:
        """megatron's tracked load-balancing loss per MoE layer and micro-batch, reduced as megatron does
        (summed over its reduce group, averaged over data-parallel ranks, summed over stages); reset.
        The reduce group (TP x CP) already sums the context-parallel parts, so after it every CP rank
        holds the same value: the sum over DP x CP divided by DP x CP is megatron's average over DP."""
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        tracker = get_moe_layer_wise_logging_tracker()
        entry = tracker.get(AUX_LOSS)
        present = torch.tensor([1.0 if entry is not None else 0.0])
        if self._reduce(present).item() == 0:
            return None  # aux loss off (coefficient 0) everywhere
        values = (entry["values"].detach().to("cpu", torch.float64).clone() if entry is not None
                  else torch.zeros(self.num_layers, dtype=torch.float64))
        group = entry.get("reduce_group") if entry is not None else None
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(values, group=group)
        values = self._reduce(values) / self._token_ranks()
        if entry is not None:
            entry["values"].zero_()
        # DP x CP ranks each counted their own calls (the same number): summed over them / their count.
        per_rank_calls = calls / self._token_ranks()
        layers = per_rank_calls > 0
        if not bool(layers.any()):
            return None
        return float((values[layers] / per_rank_calls[layers]).mean())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
