"""The converter CLIs: HF -> megatron -> HF is bit-exact, trainer checkpoints convert, errors are clear.

Runs in one process (a world of one); the 2-rank TP=2 reshard is tests/distributed/test_convert_reshard.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from megatron_speed.checkpoint import layout
from tests.tiny_models import tiny_hf_model
from tools.convert_hf_to_megatron import main as hf_to_megatron
from tools.convert_megatron_to_hf import main as megatron_to_hf


def assert_same_weights(a: Path, b: Path) -> None:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert x.keys() == y.keys()
    for name in x:
        assert x[name].dtype == y[name].dtype and torch.equal(x[name], y[name]), name


@pytest.mark.parametrize("tie", [False, True])
def test_hf_megatron_hf_round_trip_is_bit_exact(tmp_path: Path, tie: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_hf_model("qwen2", tmp_path / "src", tie=tie)
    assert hf_to_megatron(["--hf", str(src), "--out", str(tmp_path / "mg")]) == 0
    assert layout.is_complete(tmp_path / "mg")
    assert layout.read_meta(tmp_path / "mg")["tp"] == 1
    assert megatron_to_hf(["--ckpt", str(tmp_path / "mg"), "--out", str(tmp_path / "back")]) == 0
    assert_same_weights(src, tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["tie_word_embeddings"] is tie
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    reference = AutoModelForCausalLM.from_pretrained(src)
    tokens = torch.tensor([[3, 5, 7, 11, 13]])
    assert torch.equal(model(tokens).logits, reference(tokens).logits)
    assert AutoTokenizer.from_pretrained(tmp_path / "back").encode(" 12+  30=") == \
        AutoTokenizer.from_pretrained(src).encode(" 12+  30=")


def test_trainer_checkpoint_converts(tmp_path: Path) -> None:
    from megatron_speed.actor.actor import MegatronActor
    from megatron_speed.checkpoint.resume import save_checkpoint
    from megatron_speed.config.schema import AlgorithmConfig, ModelConfig, OptimConfig, ParallelConfig
    from megatron_speed.parallel import init_parallel

    src = tiny_hf_model("qwen2", tmp_path / "src")
    init_parallel(ParallelConfig(), seed=1)
    actor = MegatronActor(src, model_cfg=ModelConfig(), optim_cfg=OptimConfig(lr=1e-2, min_lr=1e-2,
                          micro_batch_size=4, mini_batch_size=4), algorithm_cfg=AlgorithmConfig(),
                          temperature=1.0, horizon=8, total_steps=2)
    tokens = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(0))
    actor.train_step(tokens, torch.ones(4, 9), actor.compute_logprobs(tokens) - 0.1, torch.ones(4, 9))
    run_dir = tmp_path / "run"
    save_checkpoint(run_dir / "checkpoints", 7, actor=actor, hf_src=src, trainer_state={"step": 7}, keep_last=1,
                    layout={"world_size": 1, "tp": 1, "pp": 1})
    trained = dict(actor.export_hf_weights())
    # A run directory is accepted: its latest complete checkpoint is converted.
    assert megatron_to_hf(["--ckpt", str(run_dir), "--out", str(tmp_path / "hf")]) == 0
    converted = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert converted.keys() == trained.keys()
    assert all(torch.equal(converted[k], trained[k]) for k in trained)
    initial = load_file(str(src / "model.safetensors"))
    assert not torch.equal(converted["model.norm.weight"], initial["model.norm.weight"])  # the trained weights


def test_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tiny_hf_model("qwen2", tmp_path / "src", tokenizer=False)
    assert hf_to_megatron(["--hf", str(src), "--out", str(tmp_path / "a"), "--tp", "2"]) == 2
    assert "needs exactly 2 processes" in capsys.readouterr().err

    from megatron_speed.checkpoint.convert import check_layout
    from tests.tiny_models import tiny_hf_config

    with pytest.raises(ValueError, match=r"--tp 3 does not divide .*num_attention_heads=4"):
        check_layout(tiny_hf_config("qwen2"), 3, 1)
    with pytest.raises(ValueError, match=r"--pp \(3\) .*must divide the model's 2 layers"):
        check_layout(tiny_hf_config("qwen2"), 1, 3)
    three = tiny_hf_config("qwen2", num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"--pp \(2\) .*3 layers.*e\.g\. --first-stage-layers=1 --last-stage-layers=2"):
        check_layout(three, 1, 2)
    with pytest.raises(ValueError, match=r"--first-stage-layers \(3\) leaves 0 of the model's 3 layers for 1"):
        check_layout(three, 1, 2, first=3)
    assert check_layout(three, 1, 2, last=1) == (2, 1)

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    assert hf_to_megatron(["--hf", str(gpt2), "--out", str(tmp_path / "b")]) == 1
    assert "unsupported architecture model_type='gpt2'" in capsys.readouterr().err

    assert hf_to_megatron(["--hf", str(src), "--out", str(tmp_path / "c")]) == 0
    (tmp_path / "c" / layout.MARKER).unlink()  # as if the conversion had died before finishing
    assert megatron_to_hf(["--ckpt", str(tmp_path / "c"), "--out", str(tmp_path / "d")]) == 1
    assert "no COMPLETE marker" in capsys.readouterr().err
    assert hf_to_megatron(["--hf", str(src), "--out", str(tmp_path / "c")]) == 1
    assert "not empty" in capsys.readouterr().err


@pytest.mark.slow
def test_converted_folder_loads_in_vllm(tmp_path: Path, closing: Any) -> None:
    from megatron_speed.config.schema import RolloutConfig
    from megatron_speed.records import PromptRecord
    from megatron_speed.rollout.engine import VLLMEngine

    src = tiny_hf_model("qwen2", tmp_path / "src")
    assert hf_to_megatron(["--hf", str(src), "--out", str(tmp_path / "mg")]) == 0
    assert megatron_to_hf(["--ckpt", str(tmp_path / "mg"), "--out", str(tmp_path / "back")]) == 0
    engine = closing(VLLMEngine(tmp_path / "back", RolloutConfig(max_new_tokens=4, kv_cache_gib=0.05),
                                max_model_len=64))
    texts = engine.generate_greedy([PromptRecord(uid="p", prompt=" 12+  30=", answer="42")])
    assert len(texts) == 1 and isinstance(texts[0], str)
