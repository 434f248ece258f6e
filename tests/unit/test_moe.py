"""Qwen3-MoE on one process: megatron MoE layers vs transformers, the per-expert bridge, routing
semantics, router metrics and the errors for what is not supported.

A tiny random Qwen3-MoE (4 experts, top-2, layer 1 dense; tests/tiny_models.py) is loaded into a
megatron GPTModel through the family mapping, as in test_bridge.py. Variants cover both router
weightings (`norm_topk_prob` on and off) and the layer pattern (`decoder_sparse_step`,
`mlp_only_layers`). Expert parallelism over 2 ranks is tests/distributed/test_moe_ep.py; vLLM
refit parity is test_moe_refit.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_speed.actor.model import build_gpt_model
from megatron_speed.actor.moe import moe_layer_pattern
from megatron_speed.bridge import mapping_for
from megatron_speed.config.base import ConfigError
from megatron_speed.config.schema import ParallelConfig
from megatron_speed.parallel import init_parallel
from megatron_speed.parallel.cpu_support import cpu_megatron
from tests.tiny_models import tiny_hf_config, tiny_hf_model

# Measured (2-core CPU, float32, 3 x 40 tokens): SDPA 9.5e-7, local attention the same order.
LOGIT_TOL = 1e-4
SEQ = 40
VARIANTS: dict[str, dict[str, Any]] = {
    "norm-topk": {},  # renormalised top-2 weights (Qwen3-30B-A3B), layer 1 dense
    "plain-softmax": {"norm_topk_prob": False},  # the full-softmax weights of the chosen experts
    "sparse-step-2": {"num_hidden_layers": 4, "decoder_sparse_step": 2, "mlp_only_layers": []},
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {name: tiny_hf_model("qwen3_moe", root / name, tokenizer=False, **kw) for name, kw in VARIANTS.items()}


def _hf_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def _megatron_from_hf(path: Path, backend: str = "sdpa", **build: Any) -> tuple[Any, Any]:
    from transformers import AutoConfig

    init_parallel(ParallelConfig(), seed=1)
    cfg = AutoConfig.from_pretrained(path)
    with cpu_megatron():
        model = build_gpt_model(cfg, params_dtype=torch.float32, attention_backend=backend, **build)
    params = dict(model.named_parameters())
    loaded = dict(mapping_for(cfg).from_hf(params, _hf_state(path)))
    assert set(loaded) == set(params)
    with torch.no_grad():
        for name, tensor in loaded.items():
            params[name].copy_(tensor)
    return model, cfg


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (3, SEQ), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("backend", ["sdpa", "local"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_megatron_moe_logits_match_transformers(hf_dirs: dict[str, Path], variant: str, backend: str) -> None:
    from transformers import AutoModelForCausalLM

    model, cfg = _megatron_from_hf(hf_dirs[variant], backend)
    model.eval()
    tokens = _tokens(cfg.vocab_size)
    with cpu_megatron(), torch.no_grad():
        logits = model(tokens, torch.arange(SEQ).expand(3, SEQ), attention_mask=None)
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(hf_dirs[variant], dtype=torch.float32)(tokens).logits
    assert (logits - want).abs().max().item() < LOGIT_TOL


def test_the_router_weighting_matters(hf_dirs: dict[str, Path]) -> None:
    """Loading the norm-topk checkpoint with the other weighting changes the logits: the test above
    would catch a wrong `moe_router_pre_softmax`."""
    from transformers import AutoConfig

    path = hf_dirs["norm-topk"]
    model, cfg = _megatron_from_hf(path)
    model.eval()
    tokens = _tokens(cfg.vocab_size)
    with cpu_megatron(), torch.no_grad():
        right = model(tokens, torch.arange(SEQ).expand(3, SEQ), attention_mask=None)
        model.config.moe_router_pre_softmax = True  # the routers share the model's config
        wrong = model(tokens, torch.arange(SEQ).expand(3, SEQ), attention_mask=None)
        model.config.moe_router_pre_softmax = False
    assert AutoConfig.from_pretrained(path).norm_topk_prob
    assert (right - wrong).abs().max().item() > 100 * LOGIT_TOL


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_megatron_hf_round_trip_is_bit_exact(hf_dirs: dict[str, Path], variant: str) -> None:
    model, cfg = _megatron_from_hf(hf_dirs[variant])
    mapping = mapping_for(cfg)
    exported = dict(pair for name, p in model.named_parameters() for pair in mapping.to_hf(name, p.detach()))
    hf = _hf_state(hf_dirs[variant])
    assert set(exported) == set(hf)
    for name, tensor in hf.items():
        assert torch.equal(exported[name], tensor), name


def test_layer_pattern_follows_transformers() -> None:
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    for kw in VARIANTS.values():
        cfg = tiny_hf_config("qwen3_moe", **kw)
        hf = AutoModelForCausalLM.from_config(cfg)
        want = [int(isinstance(layer.mlp, Qwen3MoeSparseMoeBlock)) for layer in hf.model.layers]
        assert moe_layer_pattern(cfg) == want
    assert moe_layer_pattern(tiny_hf_config("qwen3_moe")) == [1, 0]


def test_expert_names_of_both_megatron_expert_modules_map_to_hf() -> None:
    """SequentialMLP (CPU) and TransformerEngine's TEGroupedMLP (grouped GEMM) name experts differently."""
    mapping = mapping_for(tiny_hf_config("qwen3_moe"))
    fc1 = torch.arange(128 * 8, dtype=torch.float32).reshape(128, 8)
    for name in ("decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight",
                 "decoder.layers.0.mlp.experts.linear_fc1.weight3"):
        (gate_name, gate), (up_name, up) = mapping.to_hf(name, fc1)
        assert (gate_name, up_name) == ("model.layers.0.mlp.experts.3.gate_proj.weight",
                                        "model.layers.0.mlp.experts.3.up_proj.weight")
        assert torch.equal(torch.cat([gate, up]), fc1) and mapping.is_expert(name)
        assert mapping.expert_index(name) == 3
        assert mapping.with_expert_index(name, 1) == name.replace("local_experts.3", "local_experts.1").replace(
            "weight3", "weight1")
    assert not mapping.is_expert("decoder.layers.0.mlp.router.weight")
    assert mapping.to_hf("decoder.layers.0.mlp.router.weight", fc1)[0][0] == "model.layers.0.mlp.gate.weight"


def test_moe_config_fields_follow_the_hf_config() -> None:
    from megatron_speed.actor.model import transformer_config_from_hf
    from megatron_speed.actor.moe import moe_transformer_fields

    cfg = tiny_hf_config("qwen3_moe", norm_topk_prob=False, router_aux_loss_coef=0.02)
    config = transformer_config_from_hf(cfg, params_dtype=torch.float32, moe_fields=moe_transformer_fields(cfg))
    assert (config.num_moe_experts, config.moe_router_topk, config.moe_ffn_hidden_size) == (4, 2, 64)
    assert config.moe_router_pre_softmax and config.moe_layer_freq == [1, 0]
    assert config.moe_aux_loss_coeff == 0.02 and config.moe_router_load_balancing_type == "aux_loss"
    off = moe_transformer_fields(cfg, aux_loss_coef=0.0, capacity_factor=1.5)
    assert off["moe_router_load_balancing_type"] == "none" and off["moe_expert_capacity_factor"] == 1.5
    assert moe_transformer_fields(tiny_hf_config("qwen3")) == {}
    # CP: megatron scales each rank's aux loss by its 1/CP share of the tokens; the coefficient makes up
    # for it (the gradient equality is tests/distributed/test_moe_ep.py's CP test).
    assert moe_transformer_fields(cfg, cp=2)["moe_aux_loss_coeff"] == 0.04


@pytest.mark.parametrize(("model_type", "what"), [
    ("qwen2_moe", "shared experts"), ("deepseek_v3", "DeepSeek routing"), ("mixtral", "Mixtral"),
])
def test_unsupported_moe_variants_name_what_is_supported(model_type: str, what: str) -> None:
    class Cfg:
        pass

    cfg = Cfg()
    cfg.model_type = model_type
    for build in (lambda: build_gpt_model(cfg, params_dtype=torch.float32), lambda: mapping_for(cfg)):
        with pytest.raises(ValueError, match=f"MoE model_type='{model_type}' is not supported: .*{what}.*"
                                             r"Supported MoE families: qwen3_moe"):
            build()


def test_expert_parallel_errors_name_the_key() -> None:
    from megatron_speed.actor.moe import check_expert_parallel

    moe = tiny_hf_config("qwen3_moe")
    with pytest.raises(ConfigError, match=r"must divide the model's num_experts=4") as info:
        check_expert_parallel(moe, ep=3, etp=1, tp=1)
    assert info.value.key == "parallel.expert_parallel_size" and "[1, 2, 4]" in info.value.fix
    with pytest.raises(ConfigError, match="needs an MoE model"):
        check_expert_parallel(tiny_hf_config("qwen3"), ep=2, etp=1, tp=1)
    with pytest.raises(ConfigError, match="sequence parallelism"):
        check_expert_parallel(moe, ep=2, etp=2, tp=2)
    with pytest.raises(ConfigError, match="moe_intermediate_size=64") as info:
        check_expert_parallel(moe, ep=1, etp=3, tp=3)
    assert info.value.key == "parallel.expert_tensor_parallel_size"
    check_expert_parallel(moe, ep=4, etp=1, tp=1)
    from megatron_speed.actor.moe import check_trainable_layout

    with pytest.raises(ConfigError, match="must be 1 to train an MoE model") as info:
        check_trainable_layout(moe, 2)
    assert info.value.key == "parallel.tensor_parallel_size"
    check_trainable_layout(tiny_hf_config("qwen3"), 2)


def test_router_metrics_count_routed_and_dropped_tokens(hf_dirs: dict[str, Path]) -> None:
    """With a capacity factor of 0.5 each expert takes at most half its even share, so at least half
    of the token-expert assignments are dropped; dropless routing drops none."""
    from megatron_speed.actor.router_metrics import RouterMetrics

    tokens = _tokens(64)
    for capacity, check in ((0.5, lambda f: f >= 0.5), (0.0, None)):
        model, _ = _megatron_from_hf(hf_dirs["norm-topk"], moe_capacity_factor=capacity)
        metrics = RouterMetrics([model], capacity=capacity > 0)
        model.train()
        with cpu_megatron():
            model(tokens, torch.arange(SEQ).expand(3, SEQ), attention_mask=None).sum().backward()
        out = metrics.collect()
        assert set(out) >= {"moe/load_imbalance", "moe/load_imbalance_max", "moe/layer_0/load_imbalance",
                            "moe/aux_loss"}
        assert "moe/layer_1/load_imbalance" not in out  # layer 1 is dense
        assert 1.0 <= out["moe/load_imbalance"] <= 2.0
        assert ("moe/dropped_token_frac" in out) is (check is not None)
        if check is not None:
            assert check(out["moe/dropped_token_frac"])
        assert metrics.collect().get("moe/load_imbalance") is None  # reset after collecting
        metrics.remove()


def test_toy_moe_policy_is_a_supported_qwen3_moe(tmp_path: Path) -> None:
    import dataclasses

    from megatron_speed.actor.model import architecture
    from megatron_speed.config.schema import ModelConfig, ToyTaskConfig
    from megatron_speed.toy.model import toy_config
    from megatron_speed.toy.tokenizer import build_toy_tokenizer
    from megatron_speed.toy.warmup import cache_key

    tokenizer = build_toy_tokenizer(tmp_path)
    cfg = toy_config(ModelConfig(toy_family="qwen3_moe"), tokenizer)
    assert cfg.model_type == "qwen3_moe" and architecture(cfg).qk_layernorm
    assert cfg.head_dim >= 32 and moe_layer_pattern(cfg) == [1] * cfg.num_hidden_layers
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob) == (4, 2, True)
    task = ToyTaskConfig()
    dense = ModelConfig()
    # The MoE knobs do not move the dense toy's cached warm start; the family does.
    assert cache_key(dataclasses.replace(dense, toy_experts=8), task) == cache_key(dense, task)
    assert cache_key(ModelConfig(toy_family="qwen3_moe"), task) != cache_key(dense, task)
    assert cache_key(ModelConfig(toy_family="qwen3_moe", toy_experts=8), task) != \
        cache_key(ModelConfig(toy_family="qwen3_moe"), task)
