"""LoRA on megatron's column- and row-parallel linears, tensor-parallel aware.

`apply_lora` freezes every base parameter of the model chunk(s) and hangs a `LoraAdapter` under each
targeted linear (`bridge/lora.py` says which linear holds which PEFT target). A forward hook adds
the adapter's output to the linear's, so the base modules, their parameter names and megatron's
schedules are untouched; the DDP wrapper and the optimizer, built afterwards, see only the adapters
(megatron skips parameters that do not require grad), so the distributed optimizer shards adapters only.

Tensor parallelism: the adapter halves are sharded the way their base weight is.

* column-parallel W [out/tp, in] (linear_qkv, linear_fc1): A [r, in] replicated, B [out/tp, r]
  sharded on dim 0. x is replicated, `h = A x` is computed on every rank, and
  `copy_to_tensor_model_parallel_region(h)` sums dL/dh over TP in the backward pass (each rank's B
  rows see only its own outputs), so A's gradient is complete and identical on every rank.
* row-parallel W [out, in/tp] (linear_proj, linear_fc2): A [r, in/tp] sharded on dim 1, B [out, r]
  replicated. `h = A_local x_local` is a partial sum, all-reduced (`reduce_from_..._region`) before B.

Sharded halves carry megatron's `tensor_model_parallel` / `partition_dim` attributes, which the
bridge's gather, the gradient-norm (no double counting of replicated halves) and dist-checkpointing
read. A is initialised as PEFT does (Kaiming-uniform, bound 1/sqrt(in)) from a generator seeded per
tensor name, on the FULL shape, then sliced: every TP layout starts from the same adapter. B is zero,
so the adapted model starts as the base model, bit for bit.

Dropout acts on the adapter's input only. On a column-parallel input (replicated) it draws from the
default generator, which megatron seeds alike across TP ranks, so the ranks drop the same features;
on a row-parallel input (a slice) it draws from megatron's model-parallel RNG stream, which differs
per TP rank, as megatron's own dropout in TP regions does.

Deliberately left out: TransformerEngine's fused norm+linear modules (the hook would see the
un-normalised input; config validation refuses `attention_backend=te` with LoRA), sequence
parallelism (CPU-untestable here), rsLoRA/DoRA, adapters on embeddings or the LM head.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from megatron_speed.bridge.lora import AdapterTarget, adapter_param_name, linears
from megatron_speed.config.base import ConfigError
from megatron_speed.config.schema import LoraConfig


def _tp() -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()


class LoraAdapter(torch.nn.Module):
    """The (A, B) pairs of one megatron linear, one pair per HF projection it fuses.

    `out_sizes` are the LOCAL output rows of each projection; `groups` the local query groups (QKV)."""

    def __init__(self, targets: Sequence[AdapterTarget], *, layer: int, in_full: int, out_sizes: dict[str, int],
                 out_full: dict[str, int], groups: int, cfg: LoraConfig, dtype: torch.dtype) -> None:
        super().__init__()
        tp, rank = _tp()
        self.targets, self.parallel, self.fused = [t.hf for t in targets], targets[0].parallel, targets[0].fused
        self.all_parts = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}.get(
            self.fused, tuple(self.targets))
        self.out_sizes, self.groups, self.rank = out_sizes, groups, cfg.rank
        self.scaling, self.enabled = cfg.scaling, True
        self.dropout = torch.nn.Dropout(cfg.dropout) if cfg.dropout else None
        self.lora_A, self.lora_B = torch.nn.ParameterDict(), torch.nn.ParameterDict()
        for t in targets:
            a = _kaiming_a(cfg.rank, in_full, seed=cfg.seed, name=adapter_param_name(t.linear, "A", t.hf), layer=layer)
            b = torch.zeros(out_sizes[t.hf] if self.parallel == "column" else out_full[t.hf], cfg.rank)
            if self.parallel == "row":
                a = torch.chunk(a, tp, dim=1)[rank]
            self.lora_A[t.hf] = _adapter_param(a, dtype, sharded_dim=1 if self.parallel == "row" else None)
            self.lora_B[t.hf] = _adapter_param(b, dtype, sharded_dim=0 if self.parallel == "column" else None)

    # --- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The scaled adapter output in the linear's (local, fused) output layout."""
        from megatron.core import parallel_state, tensor_parallel

        group = parallel_state.get_tensor_model_parallel_group()
        if self.parallel == "row":
            x = self._drop(x, tp_slice=True)
            h = tensor_parallel.reduce_from_tensor_model_parallel_region(F.linear(x, self.lora_A[self.targets[0]]),
                                                                         group=group)
            return F.linear(h, self.lora_B[self.targets[0]]) * self.scaling
        x = self._drop(x, tp_slice=False)
        h = F.linear(x, torch.cat([self.lora_A[t] for t in self.targets]))
        h = tensor_parallel.copy_to_tensor_model_parallel_region(h, group=group)
        parts = {t: F.linear(h_t, self.lora_B[t]) for t, h_t in zip(self.targets, h.split(self.rank, dim=-1))}
        return self._assemble(parts, like=x) * self.scaling

    def _drop(self, x: torch.Tensor, *, tp_slice: bool) -> torch.Tensor:
        if self.dropout is None or not self.training:
            return x
        if not tp_slice:
            return self.dropout(x)
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        with get_cuda_rng_tracker().fork():
            return self.dropout(x)

    def _assemble(self, parts: dict[str, torch.Tensor], *, like: torch.Tensor) -> torch.Tensor:
        """Per-projection outputs [..., rows_p] -> the fused linear's output rows (zeros for untargeted
        projections): per query group [q heads; k; v] for QKV, [gate; up] for the GLU."""
        lead = next(iter(parts.values())).shape[:-1]
        full = [parts.get(p) if p in parts else like.new_zeros(*lead, self.out_sizes[p]) for p in self.all_parts]
        if self.fused != "qkv":
            return torch.cat(full, dim=-1)
        grouped = [t.reshape(*lead, self.groups, -1) for t in full]
        return torch.cat(grouped, dim=-1).reshape(*lead, -1)

    # --- merged weight ------------------------------------------------------------------------------
    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """This rank's shard of `scaling * B A` in the base weight's layout (for the merged export)."""
        if self.parallel == "row":
            t = self.targets[0]
            return (self.lora_B[t].float() @ self.lora_A[t].float()) * self.scaling
        parts = {t: (self.lora_B[t].float() @ self.lora_A[t].float()).t() for t in self.targets}
        like = next(iter(parts.values()))
        return self._assemble(parts, like=like).t() * self.scaling


def _kaiming_a(rank: int, in_full: int, *, seed: int, name: str, layer: int) -> torch.Tensor:
    """PEFT's A init (kaiming_uniform with a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))) on the full shape."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{layer}.{name}".encode()))
    bound = 1.0 / in_full ** 0.5
    return (torch.rand(rank, in_full, generator=gen, dtype=torch.float64) * 2 - 1).mul_(bound).float()


def _adapter_param(tensor: torch.Tensor, dtype: torch.dtype, *, sharded_dim: int | None) -> torch.nn.Parameter:
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    param = torch.nn.Parameter(tensor.to(device=device, dtype=dtype))
    param.is_lora = True  # the bridge and checkpoints tell adapter tensors from base weights by this
    if sharded_dim is not None:
        set_tensor_model_parallel_attributes(param, True, sharded_dim, 1)
    return param


def _hook(adapter: LoraAdapter) -> Any:
    def add_adapter(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if not adapter.enabled:
            return output
        x = args[0] if args else kwargs["input_"]
        out, bias = output
        return out + adapter(x).to(out.dtype), bias

    return add_adapter


def _require_grad_on_output(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    """Frozen embeddings give inputs that do not require grad; megatron's (reentrant) full-layer
    recomputation would then drop the adapters' gradients. Marking the embedding output fixes that."""
    return output.requires_grad_(True) if torch.is_grad_enabled() and not output.requires_grad else output


def _sizes(hf_config: Any, tp: int) -> tuple[dict[str, int], dict[str, int], dict[str, int], int]:
    """(input width per linear, full output rows per target, local output rows per target, local groups)."""
    heads, d = hf_config.num_attention_heads, getattr(hf_config, "head_dim", None) or \
        hf_config.hidden_size // hf_config.num_attention_heads
    kv = getattr(hf_config, "num_key_value_heads", None) or heads
    hidden, ffn = hf_config.hidden_size, hf_config.intermediate_size
    full = {"q_proj": heads * d, "k_proj": kv * d, "v_proj": kv * d, "o_proj": hidden, "gate_proj": ffn,
            "up_proj": ffn, "down_proj": hidden}
    local = {k: v // tp if k not in ("o_proj", "down_proj") else v for k, v in full.items()}
    inputs = {"self_attention.linear_qkv": hidden, "self_attention.linear_proj": heads * d,
              "mlp.linear_fc1": hidden, "mlp.linear_fc2": ffn}
    return inputs, full, local, kv // tp


def _check_linear(module: torch.nn.Module, path: str, target: AdapterTarget) -> None:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    expected = ColumnParallelLinear if target.parallel == "column" else RowParallelLinear
    if type(module) is not expected:
        raise ConfigError("model.lora.targets", target.hf, f"needs megatron's {expected.__name__} at {path}, "
                          f"found {type(module).__name__}", "use model.attention_backend=sdpa or local")


def apply_lora(chunk: torch.nn.Module, cfg: LoraConfig, hf_config: Any, *, dtype: torch.dtype) -> int:
    """Freeze `chunk` (a bare GPTModel) and attach adapters to its targeted linears; returns how many."""
    tp, _ = _tp()
    inputs, full, local, groups = _sizes(hf_config, tp)
    for param in chunk.parameters():
        param.requires_grad_(False)
    count = 0
    for layer in chunk.decoder.layers:
        for path, targets in linears(cfg.targets).items():
            if path.startswith("mlp.") and hasattr(layer.mlp, "experts"):
                raise ConfigError("model.lora.targets", cfg.targets, "adapts MLP projections, but this model's MLPs "
                                  "are mixture-of-experts layers (adapters on experts are not supported)",
                                  "adapt the attention only: model.lora.targets=[q_proj,k_proj,v_proj,o_proj]")
            module = layer.get_submodule(path)
            _check_linear(module, path, targets[0])
            adapter = LoraAdapter(targets, layer=layer.layer_number - 1, in_full=inputs[path], out_sizes=local,
                                  out_full=full, groups=groups, cfg=cfg, dtype=dtype)
            module.lora = adapter
            module.register_forward_hook(_hook(adapter), with_kwargs=True)
            module.weight.lora_delta = adapter.delta_weight  # the bridge's merged export adds it to W
            count += 1
    if getattr(chunk, "pre_process", False):
        chunk.embedding.register_forward_hook(_require_grad_on_output)
    return count


def adapters(chunks: Sequence[torch.nn.Module]) -> Iterator[LoraAdapter]:
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, LoraAdapter):
                yield module


@contextlib.contextmanager
def adapters_disabled(chunks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """The base model: the reference policy of a KL penalty, with no second copy of the weights."""
    found = list(adapters(chunks))
    for adapter in found:
        adapter.enabled = False
    try:
        yield
    finally:
        for adapter in found:
            adapter.enabled = True
