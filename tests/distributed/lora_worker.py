"""One rank of the LoRA layout checks (run by test_lora_tp.py under torchrun, or called in-process as
the single-rank TP=1 reference).

Every rank builds a LoRA actor (rank 4, every target) for the requested layout and, on the same full
batch, takes two training steps (the first from B = 0, where only B gets a gradient; the second with
both halves live), recording after each the loss statistics and every adapter gradient this rank holds
(TP shards gathered into full tensors, keyed by global megatron name), then exports the adapters
(PEFT names) and the merged weights, and recomputes log-probs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megatron_speed.config.schema import AlgorithmConfig, LoraConfig, ModelConfig, OptimConfig, ParallelConfig
from megatron_speed.parallel import init_parallel
from tests.distributed.tp_pp_worker import WIDTH, fixed_batch, worker_main

LORA = LoraConfig(rank=4, alpha=8.0)
ROWS = 8


def adapter_grads(actor: Any) -> dict[str, torch.Tensor]:
    """Full gradients of this rank's adapters (TP shards gathered), by global megatron name."""
    from megatron_speed.bridge.weights import _gather_tp, _global_params, bare_chunks

    out = {}
    for chunk in bare_chunks(actor.chunks):
        for name, param in _global_params(chunk, adapters=True):
            out[name] = _gather_tp(param, False, value=param.main_grad.to(param.dtype)).clone()
    return out


def run(hf_dir: Path, layout: dict[str, Any]) -> dict[str, Any]:
    from megatron_speed.actor.actor import MegatronActor

    parallel = ParallelConfig(tensor_parallel_size=layout.get("tp", 1), pipeline_parallel_size=layout.get("pp", 1))
    dims = init_parallel(parallel, seed=1)
    optim = OptimConfig(lr=1e-2, min_lr=1e-2, micro_batch_size=2, mini_batch_size=ROWS,
                        use_distributed_optimizer=layout.get("distributed_optimizer", False))
    actor = MegatronActor(hf_dir, model_cfg=ModelConfig(lora=LORA), optim_cfg=optim, algorithm_cfg=AlgorithmConfig(),
                          temperature=1.0, horizon=WIDTH - 1, total_steps=2, tp=dims.tp, pp=dims.pp)
    tokens, mask, adv = fixed_batch(actor.hf_config.vocab_size)
    logprobs = actor.compute_logprobs(tokens)
    out: dict[str, Any] = {"logprobs": logprobs, "dims": dims}
    for step in (1, 2):
        old = actor.compute_logprobs(tokens)
        out[f"stats{step}"] = actor.train_step(tokens, mask, old - 0.05 * mask, adv)
        if not optim.use_distributed_optimizer:  # its grad buffer holds reduce-scattered shards
            out[f"grads{step}"] = adapter_grads(actor)
    out["adapters"] = {k: v.clone() for k, v in actor.export_adapter_weights()}
    out["merged"] = {k: v.clone() for k, v in actor.export_hf_weights()}
    out["logprobs_after"] = actor.compute_logprobs(tokens)
    return out


if __name__ == "__main__":
    worker_main(run)
