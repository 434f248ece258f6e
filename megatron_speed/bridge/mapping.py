"""Declarative HF <-> Megatron parameter mapping, shared by the converters and the live refit.

A family (qwen2, llama, qwen3 ...) is a list of `Rule`s: a Megatron name template, the HF name
template(s) it corresponds to, and how the tensors combine (`copy`, `qkv`, `gate_up`). `{i}` stands
for the layer index and `{e}` for the (global) expert index of an MoE layer. Splitting and merging
are explicit functions below; nothing is inferred from shapes. The mapping works on full
(unsharded) tensors; gathering tensor-parallel and expert-parallel shards is the caller's job.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch


@dataclass(frozen=True)
class Rule:
    megatron: str
    hf: tuple[str, ...]
    kind: Literal["copy", "qkv", "gate_up"] = "copy"

    @property
    def expert(self) -> bool:
        """True for a per-expert tensor of an MoE layer (sharded over expert parallelism)."""
        return "{e}" in self.megatron

    def pattern(self, template: str) -> re.Pattern[str]:
        escaped = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
        return re.compile("^" + escaped + "$")


def _fill(template: str, index: dict[str, str]) -> str:
    for key, value in index.items():
        template = template.replace("{" + key + "}", value)
    return template


@dataclass(frozen=True)
class HeadLayout:
    """Attention shape facts the QKV split/merge needs."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_hf(cls, hf_config: Any) -> HeadLayout:
        heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        return cls(heads, getattr(hf_config, "num_key_value_heads", None) or heads, head_dim)


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: HeadLayout) -> torch.Tensor:
    """HF q/k/v -> Megatron's fused layout: per query group, its q heads, then its k, then its v."""
    groups, per_group, d = layout.num_kv_heads, layout.num_heads // layout.num_kv_heads, layout.head_dim
    rest = q.shape[1:]
    q = q.reshape(groups, per_group * d, *rest)
    k = k.reshape(groups, d, *rest)
    v = v.reshape(groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(groups * (per_group + 2) * d, *rest)


def split_qkv(qkv: torch.Tensor, layout: HeadLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `merge_qkv`."""
    groups, per_group, d = layout.num_kv_heads, layout.num_heads // layout.num_kv_heads, layout.head_dim
    rest = qkv.shape[1:]
    grouped = qkv.reshape(groups, (per_group + 2) * d, *rest)
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return (q.reshape(groups * per_group * d, *rest), k.reshape(groups * d, *rest),
            v.reshape(groups * d, *rest))


class FamilyMapping:
    """The rules of one architecture family plus the shape facts of one model config."""

    def __init__(self, rules: Iterable[Rule], hf_config: Any, *, tied_embeddings: bool) -> None:
        self.rules = [r for r in rules if not (tied_embeddings and r.megatron == "output_layer.weight")]
        self.layout = HeadLayout.from_hf(hf_config)
        self._mg = [(r, r.pattern(r.megatron)) for r in self.rules]

    def _match(self, name: str) -> tuple[Rule, dict[str, str]]:
        for rule, pat in self._mg:
            m = pat.match(name)
            if m:
                return rule, m.groupdict()
        raise KeyError(f"no HF mapping for Megatron parameter {name!r}")

    def kind(self, name: str) -> str:
        """How the Megatron parameter `name` combines HF tensors: "copy", "qkv" or "gate_up"."""
        return self._match(name)[0].kind

    def is_expert(self, name: str) -> bool:
        """Whether `name` is one expert's tensor (its `{e}` is a global expert index)."""
        return self._match(name)[0].expert

    def expert_index(self, name: str) -> int:
        """The expert index `{e}` in an expert tensor's name."""
        return int(self._match(name)[1]["e"])

    def with_expert_index(self, name: str, expert: int) -> str:
        """`name` with its expert index `{e}` replaced (local <-> global numbering)."""
        rule, index = self._match(name)
        return _fill(rule.megatron, {**index, "e": str(expert)})

    def to_hf(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """One full Megatron tensor -> its HF-named tensor(s)."""
        rule, index = self._match(name)
        names = [_fill(h, index) for h in rule.hf]
        if rule.kind == "qkv":
            return list(zip(names, split_qkv(tensor, self.layout)))
        if rule.kind == "gate_up":
            return list(zip(names, torch.chunk(tensor, 2, dim=0)))
        return [(names[0], tensor)]

    def from_hf(self, megatron_names: Iterable[str], hf: Mapping[str, torch.Tensor]) -> Iterator[
            tuple[str, torch.Tensor]]:
        """For each Megatron parameter name, build its full tensor from the HF state dict."""
        for name in megatron_names:
            rule, index = self._match(name)
            parts = [hf[_fill(h, index)] for h in rule.hf]
            if rule.kind == "qkv":
                yield name, merge_qkv(*parts, self.layout)
            elif rule.kind == "gate_up":
                yield name, torch.cat(parts, dim=0)
            else:
                yield name, parts[0]
