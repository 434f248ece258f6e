"""Random HF models of real shapes for the GPU benchmarks (nothing can be downloaded here).

The weights are random; the shapes, the architecture and the tokenizer interface are what the
benchmarks exercise. The toy tokenizer is saved beside the weights so vLLM and our engine can load
the folder; its ids are a small subset of the model's vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import torch

SHAPES = {  # HF config fields of the benchmarked shapes
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}


def model_dir(shape: str, cache: Path, *, max_positions: int = 4096) -> Path:
    """A random qwen2 model of `shape` under `cache`, written once (bf16 on GPU, float32 on CPU)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from megatron_speed.toy.tokenizer import build_toy_tokenizer

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    path = cache / f"{shape}-{str(dtype).removeprefix('torch.')}-{max_positions}"
    if (path / "config.json").exists():
        return path
    tokenizer = build_toy_tokenizer(path)
    cfg = Qwen2Config(**SHAPES[shape], max_position_embeddings=max_positions, rms_norm_eps=1e-6, rope_theta=1e6,
                      hidden_act="silu", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    model.save_pretrained(path)
    return path
