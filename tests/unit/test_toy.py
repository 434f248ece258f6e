"""The embedded toy task, its tokenizer, model and cached warm start (CPU, seconds)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from megatron_speed.config.base import ConfigError
from megatron_speed.config.schema import ModelConfig, ToyTaskConfig, WarmupConfig
from megatron_speed.data import toy_task
from megatron_speed.data.toy_task import (
    count_carries,
    is_correct,
    make_problems,
    parse_operands,
    solution_text,
    write_jsonl,
)
from megatron_speed.records import PromptRecord
from megatron_speed.toy import warmup
from megatron_speed.toy.model import build_toy_model, toy_qwen2_config
from megatron_speed.toy.tokenizer import build_toy_tokenizer

SMALL = ToyTaskConfig(train_size=600, eval_size=200, seed=3)


def test_splits_are_deterministic_and_disjoint() -> None:
    train, held_out = make_problems(SMALL, "train"), make_problems(SMALL, "eval")
    assert train == make_problems(SMALL, "train") and held_out == make_problems(SMALL, "eval")
    assert len(train) == SMALL.train_size and len(held_out) == SMALL.eval_size
    assert not {r.prompt for r in train} & {r.prompt for r in held_out}
    assert len({r.prompt for r in held_out}) == len(held_out)
    assert train[123].uid == "toy-train-000123" and held_out[0].uid == "toy-eval-000000"
    assert {len(r.prompt) for r in train + held_out} == {2 * SMALL.max_digits + 2}
    assert make_problems(ToyTaskConfig(train_size=600, eval_size=200, seed=4), "eval") != held_out


def test_tiny_task_space_stays_disjoint() -> None:
    cfg = ToyTaskConfig(max_digits=1, train_size=300, eval_size=50)
    train, held_out = make_problems(cfg, "train"), make_problems(cfg, "eval")
    assert len({r.prompt for r in held_out}) == 50
    assert not {r.prompt for r in train} & {r.prompt for r in held_out}
    with pytest.raises(ConfigError, match="eval_size"):
        ToyTaskConfig(max_digits=1, eval_size=51)


@pytest.mark.parametrize(("operands", "carries"), [
    ((355, 2057), 2), ((0, 0), 0), ((5, 5), 1), ((999, 1), 3), ((1234, 4321), 0),
    ((9999, 9999), 4), ((99, 99, 99), 2), ((50, 50, 1), 1),
])
def test_count_carries(operands: tuple[int, ...], carries: int) -> None:
    assert count_carries(operands) == carries


def test_prompt_format_and_solution_verifies() -> None:
    record = PromptRecord(uid="x", prompt=toy_task.format_prompt([355, 2057], 4), answer="2412")
    assert record.prompt == " 355+2057="
    assert solution_text(record) == "\\boxed{2412}" and is_correct("\\boxed{2412}", record)
    assert not is_correct("\\boxed{2413}", record) and not is_correct("2412", record)
    for r in make_problems(SMALL, "eval"):
        assert r.answer == str(sum(parse_operands(r.prompt)))
        assert solution_text(r) == f"\\boxed{{{r.answer}}}" and is_correct(solution_text(r), r)


def test_solution_verifies_with_math_verify() -> None:
    math_verify = pytest.importorskip("math_verify")
    for r in make_problems(SMALL, "eval")[:20]:
        gold = math_verify.parse(f"${r.answer}$")
        assert math_verify.verify(gold, math_verify.parse(solution_text(r)))


def test_write_jsonl(tmp_path: Path) -> None:
    records = make_problems(SMALL, "eval")[:5]
    path = write_jsonl(records, tmp_path / "eval.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0] == {"id": records[0].uid, "prompt": records[0].prompt, "answer": records[0].answer,
                       "source": records[0].source}
    assert len(rows) == 5


def test_tokenizer_round_trips_every_prompt_and_solution(tmp_path: Path) -> None:
    built = build_toy_tokenizer(tmp_path)
    toy_qwen2_config(ModelConfig(), built).save_pretrained(tmp_path)  # model_type qwen2, as served
    tok = AutoTokenizer.from_pretrained(tmp_path)  # transformers 5 rebuilds it as a Qwen2Tokenizer
    assert tok.pad_token_id != tok.eos_token_id and len(tok) == len(built)
    box = tok.encode("\\boxed{", add_special_tokens=False)
    assert len(box) == 1 and tok.convert_ids_to_tokens(box) == ["\\boxed{"]
    for r in make_problems(SMALL, "train") + make_problems(SMALL, "eval"):
        prompt_ids = tok.encode(r.prompt, add_special_tokens=False)
        assert prompt_ids == built.encode(r.prompt, add_special_tokens=False)
        assert len(prompt_ids) == len(r.prompt) and tok.decode(prompt_ids) == r.prompt
        response_ids = tok.encode(solution_text(r), add_special_tokens=False) + [tok.eos_token_id]
        assert response_ids[0] == box[0] and len(response_ids) == len(r.answer) + 3
        assert tok.decode(response_ids, skip_special_tokens=True) == solution_text(r)
    assert tok.encode(" 1+2=", add_special_tokens=True) == tok.encode(" 1+2=", add_special_tokens=False)


def test_model_config_and_forward(tmp_path: Path) -> None:
    tok = build_toy_tokenizer(tmp_path)
    config = toy_qwen2_config(ModelConfig(), tok)
    assert config.architectures == ["Qwen2ForCausalLM"] and config.tie_word_embeddings
    assert config.vocab_size % 32 == 0 and config.vocab_size >= len(tok)
    assert config.hidden_size // config.num_attention_heads >= 32
    assert (config.eos_token_id, config.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    model = build_toy_model(config, seed=0)
    same = build_toy_model(config, seed=0)
    assert torch.equal(model.model.embed_tokens.weight, same.model.embed_tokens.weight)
    tokens, mask = warmup.encode_examples(make_problems(SMALL, "eval")[:8], tok)
    assert model(input_ids=tokens).logits.shape == (8, tokens.shape[1], config.vocab_size)
    assert torch.isfinite(warmup.response_loss(model, tokens, mask))
    assert mask.sum(1).tolist() == [len(r.answer) + 3 for r in make_problems(SMALL, "eval")[:8]]


def test_prepare_toy_model_builds_once_then_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    task = ToyTaskConfig(train_size=64, eval_size=16)
    model_cfg = ModelConfig(warmup=WarmupConfig(steps=2, batch_size=8))
    path = warmup.prepare_toy_model(model_cfg, task, tmp_path)
    expected = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "generation_config.json", "warmup.json"}
    assert expected <= {p.name for p in path.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary folder left behind
    assert json.loads((path / "warmup.json").read_text())["steps"] == 2

    def no_rebuild(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached toy model was rebuilt")

    monkeypatch.setattr(warmup, "build_toy_folder", no_rebuild)
    with caplog.at_level(logging.INFO, logger=warmup.__name__):
        assert warmup.prepare_toy_model(model_cfg, task, tmp_path) == path
    assert "reusing" in caplog.text
    other = ModelConfig(warmup=WarmupConfig(steps=3, batch_size=8))
    assert warmup.cache_key(other, task) != warmup.cache_key(model_cfg, task)


def test_evaluate_hf_model_reports_accuracy_and_pass_rates(tmp_path: Path) -> None:
    task = ToyTaskConfig(train_size=64, eval_size=16)
    path = warmup.prepare_toy_model(ModelConfig(warmup=WarmupConfig(steps=1, batch_size=8)), task, tmp_path)
    records = make_problems(task, "eval")
    report = warmup.evaluate_hf_model(path, records, greedy=True, samples=2, max_new_tokens=8)
    assert 0.0 <= report["greedy_accuracy"] <= 1.0 and 0.0 <= report["mean_pass_rate"] <= 1.0
    assert set(report["pass_rates"]) == {r.uid for r in records}
    assert sum(report["pass_count_histogram"]) == len(records)
    assert sum(g["num_prompts"] for g in report["by_carries"].values()) == len(records)
