"""Sequence packing and the context-parallel split, piece by piece (CPU, one process).

* bin packing: every sequence placed once, equal micro-batch counts per data-parallel rank, the
  token budget held where it can be, ranks balanced to within one sequence;
* the THD layout: positions restart per sequence, labels are the next tokens, and the CP split keeps
  chunks r and 2·CP−1−r of each sequence, so the ranks' positions tile every sequence exactly once;
* per-sequence aggregation over packed rows (also split over CP holders) equals the padded one;
* packed attention equals per-sequence causal SDPA for each kernel (per-sequence blocks, one dense
  mask, FlexAttention) and for megatron's `PackedSeqParams` through `SDPAttention`, and a CP rank's
  attention over gathered keys equals the matching rows of the unsplit attention;
* config validation names what does not combine.
"""

from __future__ import annotations

import itertools
import random
import warnings

import pytest
import torch
import torch.nn.functional as F

from megatron_speed.actor.packed_attention import gathered_layout, masked_attention, packed_layout
from megatron_speed.actor.packing import (
    balanced_bins,
    build_packed,
    first_fit_decreasing,
    padded_length,
    scatter_packed,
)
from megatron_speed.algorithms.aggregation import LOSS_AGGREGATIONS, aggregate_loss, aggregate_segments
from megatron_speed.config.base import ConfigError
from megatron_speed.config.schema import Config, DataConfig, ModelConfig, OptimConfig, ParallelConfig, ToyTaskConfig

# --- bin packing -------------------------------------------------------------------------------------


def _long_tail(n: int, seed: int, cap: int = 3000) -> list[int]:
    """Prompt + response lengths shaped like the recipes': most short, a tail to max_new_tokens."""
    rng = random.Random(seed)
    return [rng.randint(50, 300) + min(cap, int(rng.lognormvariate(6.3, 0.8))) for _ in range(n)]


@pytest.mark.parametrize(("ranks", "capacity", "seed"), [(1, 4096, 0), (2, 4096, 1), (4, 8192, 2), (3, 2048, 3)])
def test_balanced_bins_place_every_sequence_once_and_balance_ranks(ranks: int, capacity: int, seed: int) -> None:
    lengths = _long_tail(96, seed)
    plan = balanced_bins(lengths, capacity=capacity, ranks=ranks)
    assert len(plan) == ranks and len({len(r) for r in plan}) == 1  # same micro-batch count everywhere
    placed = sorted(i for rank in plan for mb in rank for i in mb)
    assert placed == list(range(len(lengths)))
    for rank in plan:
        for mb in rank:
            assert mb, "no empty micro-batch"
            load = sum(lengths[i] for i in mb)
            assert load <= capacity or len(mb) == 1  # only a sequence longer than the budget exceeds it
    totals = [sum(lengths[i] for mb in rank for i in mb) for rank in plan]
    assert max(totals) - min(totals) <= max(lengths)
    # Not many more micro-batches than first-fit-decreasing needs (rounded up to the ranks).
    ffd = first_fit_decreasing(lengths, capacity)
    assert len(plan[0]) * ranks <= ranks * -(-ffd // ranks) + ranks


def test_balanced_bins_minimum_counts_and_too_few_sequences() -> None:
    plan = balanced_bins([5, 5, 5, 5], capacity=100, ranks=2, min_per_rank=2)
    assert [len(r) for r in plan] == [2, 2]
    with pytest.raises(ValueError, match="cannot fill"):
        balanced_bins([5, 5, 5], capacity=100, ranks=2, min_per_rank=2)


def test_over_long_sequence_gets_its_own_micro_batch() -> None:
    plan = balanced_bins([500, 10, 10, 10], capacity=64, ranks=1)
    assert [0] in plan[0]


# --- THD layout and the CP split ---------------------------------------------------------------------


def _batch() -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    tokens = torch.arange(1, 41).reshape(4, 10)
    mask = torch.zeros(4, 9)
    lengths = [10, 3, 7, 5]
    for r, n in enumerate(lengths):
        mask[r, 1:n - 1] = 1.0
        tokens[r, n:] = 0
    return tokens, mask, lengths


def test_packed_row_restarts_positions_and_aligns_labels() -> None:
    tokens, mask, lengths = _batch()
    values = torch.arange(36, dtype=torch.float32).reshape(4, 9)
    mb = build_packed([1, 3], lengths, tokens, mask, values)
    assert mb.tokens[0].tolist() == tokens[1, :3].tolist() + tokens[3, :5].tolist()
    assert mb.positions[0].tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
    assert mb.labels[0].tolist() == tokens[1, 1:3].tolist() + [0] + tokens[3, 1:5].tolist() + [0]
    assert mb.old_logprobs[0].tolist() == values[1, :2].tolist() + [0] + values[3, :4].tolist() + [0]
    assert mb.cu_seqlens.tolist() == [0, 3, 8] and mb.cu_seqlens_padded.tolist() == [0, 3, 8]
    assert mb.segment_tokens.tolist() == [1.0, 3.0] and mb.real_tokens == 8
    out = scatter_packed([(mb, mb.old_logprobs)], torch.full((4, 9), -1.0))
    assert out[1, :2].tolist() == values[1, :2].tolist() and out[3, :4].tolist() == values[3, :4].tolist()
    assert out[1, 2:].eq(-1).all() and out[0].eq(-1).all()


@pytest.mark.parametrize("cp", [2, 3])
def test_cp_split_is_load_balanced_and_tiles_every_sequence(cp: int) -> None:
    tokens, mask, lengths = _batch()
    group = [0, 1, 2, 3]
    parts = [build_packed(group, lengths, tokens, mask, cp=cp, cp_rank=r) for r in range(cp)]
    padded = [padded_length(n, cp) for n in lengths]
    assert all(p % (2 * cp) == 0 for p in padded)
    assert {len(p.tokens[0]) for p in parts} == {sum(padded) // cp}  # equal shares
    seen = sorted((int(s), int(q)) for p in parts for s, q in zip(p.segment, p.positions[0]))
    assert seen == sorted((s, q) for s, n in enumerate(padded) for q in range(n))
    for r, part in enumerate(parts):
        seq, pos = packed_layout(part.cu_seqlens_padded, cp, r)
        assert torch.equal(seq, part.segment) and torch.equal(pos, part.positions[0])
        chunk = padded[0] // (2 * cp)  # sequence 0: chunks r and 2cp-1-r
        want = list(range(r * chunk, (r + 1) * chunk)) + list(range((2 * cp - 1 - r) * chunk, (2 * cp - r) * chunk))
        assert part.positions[0, :2 * chunk].tolist() == want
    assert sum(p.real_tokens for p in parts) == sum(lengths)
    assert [bool(p.segment_counted.all()) for p in parts] == [True] + [False] * (cp - 1)


def test_width_pads_with_a_sequence_of_its_own() -> None:
    tokens, mask, lengths = _batch()
    mb = build_packed([1], lengths, tokens, mask, cp=2, cp_rank=0, width=12)
    assert mb.cu_seqlens_padded.tolist() == [0, 4, 12] and mb.tokens.shape == (1, 6)
    assert mb.rows[:2].eq(1).all() and mb.rows[2:].eq(-1).all() and mb.cols[2:].eq(-1).all()
    assert mb.segment_tokens.tolist() == [1.0, 0.0] and mb.real_tokens == 1  # positions 0 (real) and 3 (pad)


# --- per-sequence aggregation -----------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", sorted(LOSS_AGGREGATIONS))
def test_segment_aggregation_equals_padded_aggregation(aggregation: str) -> None:
    tokens, mask, lengths = _batch()
    loss = torch.randn(4, 9)
    want = aggregate_loss(loss, mask, aggregation=aggregation, horizon=9)
    for cp in (1, 2):
        parts = [build_packed([0, 1, 2, 3], lengths, tokens, mask, loss, cp=cp, cp_rank=r) for r in range(cp)]
        sums = [aggregate_segments(p.old_logprobs, p.mask, p.segment, segment_tokens=p.segment_tokens,
                                   segment_counted=p.segment_counted, aggregation=aggregation, horizon=9)
                for p in parts]
        assert sum(float(n) for n, _ in sums) == pytest.approx(float(want[0]), rel=1e-5, abs=1e-6)
        assert sum(int(d) for _, d in sums) == int(want[1])


# --- attention --------------------------------------------------------------------------------------


def _qkv(t: int, gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(1, h, t, 32, generator=gen) for h in (4, 2, 2)]


def _per_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: list[int]) -> torch.Tensor:
    return torch.cat([F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True,
                                                     scale=0.2, enable_gqa=True) for s, e in itertools.pairwise(cu)], 2)


@pytest.mark.parametrize("kernel", ["blocks", "dense", "flex"])
def test_packed_attention_equals_per_sequence_causal_attention(kernel: str) -> None:
    cu = [0, 5, 12, 13, 20]
    seq, pos = packed_layout(torch.tensor(cu, dtype=torch.int32))
    q, k, v = _qkv(20, torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention warns that it is not compiled
        got = masked_attention(q, k, v, (seq, pos, seq, pos), scale=0.2, gqa=True, kernel=kernel)
    assert torch.allclose(got, _per_sequence(q, k, v, cu), atol=1e-6)


def test_cp_rank_attention_over_gathered_keys_equals_unsplit_rows() -> None:
    """What each CP rank computes (its query chunks over all ranks' keys, in gathered order) is the
    unsplit packed attention at those positions: the causal offsets between chunks are right."""
    cp, cu = 2, torch.tensor([0, 8, 12, 24], dtype=torch.int32)
    q, k, v = _qkv(24, torch.Generator().manual_seed(1))
    full = _per_sequence(q, k, v, cu.tolist())
    seq_all, pos_all = packed_layout(cu)
    index = {(int(s), int(p)): i for i, (s, p) in enumerate(zip(seq_all, pos_all))}
    k_seq, k_pos = gathered_layout(cu, cp)
    k_idx = torch.tensor([index[(int(s), int(p))] for s, p in zip(k_seq, k_pos)])
    for r in range(cp):
        q_seq, q_pos = packed_layout(cu, cp, r)
        q_idx = torch.tensor([index[(int(s), int(p))] for s, p in zip(q_seq, q_pos)])
        for kernel in ("blocks", "dense"):
            got = masked_attention(q[:, :, q_idx], k[:, :, k_idx], v[:, :, k_idx], (q_seq, q_pos, k_seq, k_pos),
                                   scale=0.2, gqa=True, kernel=kernel)
            assert torch.allclose(got, full[:, :, q_idx], atol=1e-6), kernel


def test_sdpa_module_takes_megatron_packed_seq_params() -> None:
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_speed.actor.attention import SDPAttention
    from megatron_speed.parallel import init_parallel
    from megatron_speed.parallel.cpu_support import cpu_megatron

    init_parallel(ParallelConfig(), seed=1)
    config = TransformerConfig(num_layers=1, hidden_size=128, num_attention_heads=4, num_query_groups=2,
                               kv_channels=32, attention_dropout=0.0, use_cpu_initialization=True)
    with cpu_megatron():
        module = SDPAttention(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                              attention_type="self")
    cu = torch.tensor([0, 6, 9, 16], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=7, max_seqlen_kv=7)
    q, k, v = _qkv(16, torch.Generator().manual_seed(2))
    thd = [t[0].permute(1, 0, 2).contiguous() for t in (q, k, v)]  # [t, heads, d], as megatron hands them
    module.softmax_scale = 0.2
    out = module(*thd, None, packed_seq_params=params)
    want = _per_sequence(q, k, v, cu.tolist())[0].permute(1, 0, 2).reshape(16, 128)
    assert out.shape == (16, 128) and torch.allclose(out, want, atol=1e-6)


# --- config -----------------------------------------------------------------------------------------


def _config(**sections: object) -> Config:
    return Config(data=DataConfig(toy=ToyTaskConfig()), **sections)


def test_config_names_what_does_not_combine() -> None:
    packed = OptimConfig(pack_sequences=True, micro_batch_tokens=512)
    with pytest.raises(ConfigError, match=r"parallel\.context_parallel_size \(2\) needs packed sequences"):
        _config(parallel=ParallelConfig(context_parallel_size=2))
    with pytest.raises(ConfigError, match=r"optim\.micro_batch_tokens \(1000\) must be a multiple of 2 x"):
        _config(parallel=ParallelConfig(context_parallel_size=3),
                optim=OptimConfig(pack_sequences=True, micro_batch_tokens=1000))
    with pytest.raises(ConfigError, match=r"pack_sequences \(True\) needs a token budget"):
        OptimConfig(pack_sequences=True)
    with pytest.raises(ConfigError, match=r"model\.attention_backend \('local'\)"):
        _config(model=ModelConfig(attention_backend="local"), optim=packed)
    with pytest.raises(ConfigError, match=r"context_parallel_size \(0\) must be >= 1"):
        ParallelConfig(context_parallel_size=0)
    assert _config(parallel=ParallelConfig(context_parallel_size=2), optim=packed).parallel.context_parallel_size == 2
