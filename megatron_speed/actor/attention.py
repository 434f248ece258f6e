"""Core attention on `torch.nn.functional.scaled_dot_product_attention`, for megatron's local layer spec.

Why: without TransformerEngine, megatron-core's local spec uses `DotProductAttention`, which
materialises the [b, heads, s, s] score matrix, copies K and V once per query head for GQA and runs
an unfused softmax. SDPA dispatches to a fused kernel (flash / memory-efficient on GPU, a flash
kernel on CPU) with GQA handled inside (`enable_gqa`), so memory grows with s instead of s^2.

It is a drop-in for the `core_attention` submodule of `SelfAttention`: same constructor keywords,
same forward signature and tensor layouts as `DotProductAttention`:
query [sq, b, np, hn], key/value [sk, b, ng, hn] (np query heads and ng query groups local to
this tensor-parallel rank) -> context [sq, b, np * hn].

Masking follows megatron's convention: `attention_mask` is boolean with True = masked out,
broadcastable to [b, np, sq, sk]; when it is None and the layer is causal, SDPA's own causal mask is
used. One deliberate difference: a query row whose keys are ALL masked gives NaN here, where
megatron's fill value of -10000 gives a uniform average; causal masks never produce such rows.

Packed sequences (THD, megatron's `PackedSeqParams` with qkv_format "thd"): query [t, np, hn],
key/value [t, ng, hn] of one packed row -> context [t, np * hn]; attention never crosses sequences
and, with context parallelism (CP > 1, which needs packing), keys and values are gathered over the
CP group first. Mask rule, CP split and kernels (SDPA per sequence on CPU, FlexAttention on CUDA,
a dense-mask reference): `packed_attention.py`.

Deliberately left out (rejected at construction or call, not silently ignored): additive attention
bias, sliding windows, softmax offsets, context parallelism without packed sequences.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide

from megatron_speed.actor.packed_attention import gather_sequence, gathered_layout, masked_attention, packed_layout


class SDPAttention(MegatronModule):
    """Megatron `DotProductAttention` semantics on `F.scaled_dot_product_attention`."""

    def __init__(self, config: Any, layer_number: int, attn_mask_type: Any, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection: Any = None) -> None:
        super().__init__(config=config)
        unsupported = {"window_size": config.window_size is not None,
                       "softmax_type": config.softmax_type != "vanilla"}
        if any(unsupported.values()):
            raise ValueError(f"SDPAttention does not support {[k for k, v in unsupported.items() if v]}; "
                             "use model.attention_backend='te' or 'local'")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        tp = pg_collection.tp.size()
        self.cp_group = getattr(pg_collection, "cp", None)
        self.cp = self.cp_group.size() if self.cp_group is not None else 1
        self.attn_mask_type = attn_mask_type
        self.num_heads = divide(config.num_attention_heads, tp)
        self.num_groups = divide(config.num_query_groups, tp)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: Any = None,
                attention_bias: torch.Tensor | None = None, packed_seq_params: Any = None) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("SDPAttention does not support attention_bias; use model.attention_backend='te'")
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        if self.cp > 1:
            raise ValueError("SDPAttention runs context parallelism on packed sequences only "
                             "(optim.pack_sequences=true)")
        sq, b = query.shape[0], query.shape[1]
        # [s, b, heads, d] -> [b, heads, s, d], the layout SDPA expects.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
        mask = None if attention_mask is None else ~attention_mask  # SDPA: True = attend
        dropout = self.dropout if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork() if dropout else contextlib.nullcontext():
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal and mask is None and sq > 1,
                scale=self.softmax_scale, enable_gqa=self.num_heads != self.num_groups)
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.num_heads * self.head_dim)


    def _packed(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, params: Any) -> torch.Tensor:
        """THD: [t, heads, d] tensors of one packed row (this CP rank's chunks) -> [t, np * hn]."""
        if params.qkv_format != "thd":
            raise ValueError(f"SDPAttention packs THD only, got qkv_format={params.qkv_format!r}")
        cu = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        rank = self.cp_group.rank() if self.cp > 1 else 0
        q_seq, q_pos = packed_layout(cu, self.cp, rank)
        if self.cp > 1:
            key, value = gather_sequence(key, self.cp_group), gather_sequence(value, self.cp_group)
            k_seq, k_pos = gathered_layout(cu, self.cp)
        else:
            k_seq, k_pos = q_seq, q_pos
        if q_seq.numel() != query.shape[0]:
            raise ValueError(f"packed row of {query.shape[0]} tokens does not match cu_seqlens {cu.tolist()} "
                             f"split over {self.cp} context-parallel ranks")
        q, k, v = (t.permute(1, 0, 2).unsqueeze(0) for t in (query, key, value))  # [1, heads, t, d]
        dropout = self.dropout if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork() if dropout else contextlib.nullcontext():
            context = masked_attention(q, k, v, (q_seq, q_pos, k_seq, k_pos), scale=self.softmax_scale,
                                       gqa=self.num_heads != self.num_groups, dropout=dropout)
        return context[0].permute(1, 0, 2).reshape(query.shape[0], self.num_heads * self.head_dim)
