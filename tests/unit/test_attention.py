"""SDPA core attention against megatron's own DotProductAttention, the backend switch, and
activation recomputation on CPU.

The module test feeds both attentions the same [s, b, heads, d] tensors with grouped-query
attention (4 query heads over 2 groups) and compares outputs and the gradients of q, k and v, for
the causal default (no mask) and for an explicit boolean mask in megatron's convention.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_speed.actor.attention import SDPAttention
from megatron_speed.actor.model import build_gpt_model, resolve_attention_backend
from megatron_speed.config.base import ConfigError
from megatron_speed.config.schema import ModelConfig, ParallelConfig
from megatron_speed.parallel import init_parallel
from megatron_speed.parallel.cpu_support import cpu_megatron
from tests.tiny_models import tiny_hf_config

HEADS, GROUPS, HEAD_DIM, SEQ, BATCH = 4, 2, 16, 12, 3


def _has_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def _attention_config() -> Any:
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                             num_query_groups=GROUPS, kv_channels=HEAD_DIM, attention_dropout=0.0,
                             masked_softmax_fusion=False, use_cpu_initialization=True)


def _right_padding_mask(lengths: list[int]) -> torch.Tensor:
    """[b, 1, s, s] bool, True = masked: causal, and keys past each row's length hidden."""
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)
    pad = torch.arange(SEQ)[None, :] >= torch.tensor(lengths)[:, None]  # [b, sk]
    return causal[None, None] | pad[:, None, None, :]


def _run(module: torch.nn.Module, inputs: list[torch.Tensor], mask: torch.Tensor | None,
         weight: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    with cpu_megatron():
        out = module(*leaves, mask)
    (out * weight).sum().backward()
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "explicit-mask"])
def test_sdpa_matches_megatron_dot_product_attention(masked: bool) -> None:
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    init_parallel(ParallelConfig(), seed=1)
    config = _attention_config()
    kwargs = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    with cpu_megatron():
        sdpa, local = SDPAttention(**kwargs), DotProductAttention(**kwargs)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(SEQ, BATCH, n, HEAD_DIM, generator=gen) for n in (HEADS, GROUPS, GROUPS)]
    weight = torch.randn(SEQ, BATCH, HEADS * HEAD_DIM, generator=gen)
    mask = _right_padding_mask([SEQ, 7, 3]) if masked else None
    out, grads = _run(sdpa, inputs, mask, weight)
    want, want_grads = _run(local, inputs, mask, weight)
    assert out.shape == (SEQ, BATCH, HEADS * HEAD_DIM)
    assert torch.allclose(out, want, atol=1e-5, rtol=1e-5)
    for name, g, w in zip("qkv", grads, want_grads):
        assert g.shape == w.shape and torch.allclose(g, w, atol=1e-5, rtol=1e-5), name
    if masked:  # the mask really changed the result
        causal_out, _ = _run(sdpa, inputs, None, weight)
        assert not torch.allclose(causal_out, out)


def _core_attention_types(backend: str) -> set[str]:
    init_parallel(ParallelConfig(), seed=1)
    with cpu_megatron():
        model = build_gpt_model(tiny_hf_config("qwen2"), params_dtype=torch.float32, attention_backend=backend)
    return {type(layer.self_attention.core_attention).__name__ for layer in model.decoder.layers}


@pytest.mark.skipif(_has_te(), reason="transformer_engine is installed: auto resolves to te")
def test_backend_switch_builds_the_chosen_core_attention() -> None:
    assert resolve_attention_backend("auto") == "sdpa"
    assert _core_attention_types("auto") == {"SDPAttention"}
    assert _core_attention_types("sdpa") == {"SDPAttention"}
    assert _core_attention_types("local") == {"DotProductAttention"}
    with pytest.raises(ConfigError, match="needs transformer_engine") as info:
        resolve_attention_backend("te")
    assert info.value.key == "model.attention_backend"


def test_bad_attention_backend_and_recompute_name_the_dotted_key() -> None:
    from megatron_speed.config.loader import load_config
    from megatron_speed.recipes import toy_cpu

    with pytest.raises(ConfigError, match=r"'flash'.*must be one of 'auto', 'sdpa', 'local', 'te'") as info:
        load_config(toy_cpu(), ["model.attention_backend=flash"])
    assert info.value.key == "model.attention_backend"
    with pytest.raises(ConfigError) as info:
        load_config(toy_cpu(), ["model.recompute=everything"])
    assert info.value.key == "model.recompute"
    with pytest.raises(ConfigError) as info:  # callers that bypass the config get the same error
        build_gpt_model(tiny_hf_config("qwen2"), params_dtype=torch.float32, attention_backend="flash")
    assert info.value.key == "model.attention_backend"
    assert ModelConfig(attention_backend="local", recompute="full").recompute == "full"


def _grads_and_calls(recompute: str) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Gradients of a sum of logits, and how often core attention and whole layers ran forward."""
    init_parallel(ParallelConfig(), seed=1)
    torch.manual_seed(0)
    with cpu_megatron():
        model = build_gpt_model(tiny_hf_config("qwen3"), params_dtype=torch.float32, recompute=recompute)
    calls = {"core_attn": 0, "layer": 0}
    for layer in model.decoder.layers:
        layer.register_forward_hook(lambda *_: calls.__setitem__("layer", calls["layer"] + 1))
        layer.self_attention.core_attention.register_forward_hook(
            lambda *_: calls.__setitem__("core_attn", calls["core_attn"] + 1))
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    model.train()
    with cpu_megatron():
        logits = model(tokens, torch.arange(16).expand(2, 16), attention_mask=None)
        (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, calls


def test_recompute_keeps_gradients_and_really_recomputes() -> None:
    base, base_calls = _grads_and_calls("none")
    layers = tiny_hf_config("qwen3").num_hidden_layers
    assert base_calls == {"core_attn": layers, "layer": layers}
    for mode, rerun in (("selective", "core_attn"), ("full", "layer")):
        grads, calls = _grads_and_calls(mode)
        assert calls[rerun] == 2 * layers, (mode, calls)  # forward, then again during backward
        for name, g in base.items():
            assert torch.allclose(grads[name], g, atol=1e-6, rtol=1e-5), (mode, name)


def test_tiny_models_write_loadable_folders(tmp_path: Path) -> None:
    from transformers import AutoConfig

    from tests.tiny_models import tiny_hf_model

    path = tiny_hf_model("qwen3", tmp_path / "q3", tie=True, num_hidden_layers=3)
    cfg = AutoConfig.from_pretrained(path)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.tie_word_embeddings, cfg.head_dim) == ("qwen3", 3, True, 64)
    assert (path / "tokenizer.json").exists() and (path / "model.safetensors").exists()


BROKEN_TE = {  # a TransformerEngine install whose top-level package imports but whose torch part cannot load
    "transformer_engine/__init__.py": "__version__ = '2.20.2'\n",
    "transformer_engine/pytorch/__init__.py":
        "raise OSError('libtransformer_engine.so: undefined symbol: cudaGetDriverEntryPointByVersion')\n",
}


def test_auto_backend_falls_back_to_sdpa_when_transformer_engine_pytorch_cannot_load(tmp_path: Path) -> None:
    """`import transformer_engine` succeeding is not enough: megatron needs `transformer_engine.pytorch`
    (its HAVE_TE probe). Run in a fresh interpreter with that broken install first on the path."""
    import subprocess
    import sys

    for name, text in BROKEN_TE.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    script = ("import transformer_engine\n"  # the shallow probe passes
              "from megatron_speed.actor.model import resolve_attention_backend\n"
              "from megatron_speed.config.base import ConfigError\n"
              "print(resolve_attention_backend('auto'))\n"
              "try:\n    resolve_attention_backend('te')\nexcept ConfigError as err:\n    print('te:', err)\n")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": f"{tmp_path}:{root}"})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "sdpa"
    assert lines[1].startswith("te:") and "model.attention_backend" in lines[1] and "undefined symbol" in lines[1]
