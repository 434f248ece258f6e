"""Supervised warm start of the toy model, cached on disk as an HF folder, and its evaluation.

RL from a random model never sees a reward, so the toy policy is first trained for a fixed number of
steps on worked answers (`\\boxed{sum}` + end-of-sequence, loss on response tokens only). The step
count is calibrated to stop *mid-way*: greedy held-out accuracy near 0.6 and per-prompt pass rates
spread between 0 and 1, so that RL has room to improve (see `reference/toy-task.md`: the warm-up
is abrupt, and a longer one leaves most prompts at pass rate 1).

`prepare_toy_model` returns the folder `cache_root/<hash of the task, toy model and warm-up
config>/` (config.json, model.safetensors, tokenizer files, generation_config.json, warmup.json),
building it only when absent. The build writes to a hidden temporary folder and renames it into
place, so an interrupted build never leaves a half folder. It does not coordinate ranks: call it on
one rank and let the others wait on a barrier.

`evaluate_hf_model` is the local yardstick for calibration and tests (HF generate, exact-match
grading); the run itself evaluates through vLLM and math-verify.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from megatron_speed.config.base import to_dict
from megatron_speed.config.schema import ModelConfig, ToyTaskConfig, WarmupConfig
from megatron_speed.data.toy_task import (
    count_carries,
    is_correct,
    make_problems,
    parse_operands,
    solution_text,
)
from megatron_speed.records import PromptRecord
from megatron_speed.toy.model import build_toy_model, toy_config
from megatron_speed.toy.tokenizer import build_toy_tokenizer

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the build changes in a way the config hash cannot see


def encode_examples(records: Sequence[PromptRecord], tokenizer: PreTrainedTokenizerBase
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `prompt + solution + eos` token rows and their next-token loss mask.

    `mask[i, t]` is 1 where `tokens[i, t+1]` is a response token (the solution or its eos), the same
    alignment as `TrainBatch.response_mask`.
    """
    rows, starts = [], []
    for r in records:
        prompt = tokenizer.encode(r.prompt, add_special_tokens=False)
        response = tokenizer.encode(solution_text(r), add_special_tokens=False) + [tokenizer.eos_token_id]
        rows.append(prompt + response)
        starts.append(len(prompt))
    width = max(len(row) for row in rows)
    tokens = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width - 1), dtype=torch.float32)
    for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, start - 1 : len(row) - 1] = 1.0
    return tokens, mask


def response_loss(model: PreTrainedModel, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over response tokens (padding comes after, so no attn mask)."""
    logits = model(input_ids=tokens, use_cache=False).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    return (nll * mask).sum() / mask.sum()


def train_warmup(model: PreTrainedModel, tokens: torch.Tensor, mask: torch.Tensor,
                 cfg: WarmupConfig) -> list[float]:
    """`cfg.steps` AdamW steps on random batches of the rows; returns the loss of every step.

    Constant learning rate, no weight decay, batches drawn with replacement from a generator seeded
    by `cfg.seed`, so the result depends only on the config and the CPU's float arithmetic (thread
    count included). The accuracy curve is steep (about +0.2 greedy accuracy per 25 steps around
    the default), so a changed seed, lr or model needs its step count recalibrated.
    """
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(cfg.steps):
        idx = torch.randint(0, tokens.shape[0], (cfg.batch_size,), generator=generator)
        loss = response_loss(model, tokens[idx], mask[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


# The MoE toy's fields; left out of the dense toy's cache key so existing dense warm starts keep their hash.
_MOE_FIELDS = ("toy_family", "toy_experts", "toy_experts_per_token", "toy_expert_ffn_hidden_size")


def cache_key(model_cfg: ModelConfig, task_cfg: ToyTaskConfig) -> str:
    """Short hash of everything the warmed-up folder depends on (not hf_path or params_dtype)."""
    toy_fields = {f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(model_cfg)
                  if f.name.startswith("toy_") and (model_cfg.toy_family != "qwen2" or f.name not in _MOE_FIELDS)}
    payload = {"format": CACHE_FORMAT, "task": to_dict(task_cfg), "model": toy_fields,
               "warmup": to_dict(model_cfg.warmup)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def build_toy_folder(model_cfg: ModelConfig, task_cfg: ToyTaskConfig, out_dir: Path) -> dict[str, Any]:
    """Build tokenizer, model and warm-up into `out_dir` (an HF folder); returns the warm-up record."""
    tokenizer = build_toy_tokenizer(out_dir)
    config = toy_config(model_cfg, tokenizer)
    model = build_toy_model(config, seed=model_cfg.warmup.seed)
    tokens, mask = encode_examples(make_problems(task_cfg, "train"), tokenizer)
    if tokens.shape[1] + 1 > config.max_position_embeddings:
        raise ValueError(f"model.toy_max_position_embeddings ({config.max_position_embeddings}) is "
                         f"shorter than a toy sequence ({tokens.shape[1]} tokens): raise it")
    start = time.perf_counter()
    losses = train_warmup(model, tokens, mask, model_cfg.warmup)
    seconds = time.perf_counter() - start
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(str(out_dir))
    record = {"cache_key": cache_key(model_cfg, task_cfg), "seconds": round(seconds, 2),
              "steps": len(losses), "final_loss": losses[-1] if losses else None,
              "task": to_dict(task_cfg), "warmup": to_dict(model_cfg.warmup)}
    (out_dir / "warmup.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def prepare_toy_model(model_cfg: ModelConfig, task_cfg: ToyTaskConfig, cache_root: Path) -> Path:
    """The warmed-up toy model's HF folder under `cache_root`, built on first use and reused after."""
    final = Path(cache_root) / cache_key(model_cfg, task_cfg)
    if (final / "config.json").is_file():
        log.info("toy model: reusing cached warm start %s", final)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("toy model: warming up %d steps into %s", model_cfg.warmup.steps, final)
    try:
        record = build_toy_folder(model_cfg, task_cfg, tmp)
        log.info("toy model: warm-up took %.1f s, final loss %s", record["seconds"], record["final_loss"])
        os.rename(tmp, final)
    except OSError:
        if not (final / "config.json").is_file():  # anything but a lost race with another builder
            raise
        log.info("toy model: another process built %s first; using it", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _generate(model: PreTrainedModel, prompt_ids: torch.Tensor, *, greedy: bool, samples: int,
              max_new_tokens: int, eos_id: int, pad_id: int) -> torch.Tensor:
    """New tokens for each prompt row (`samples` rows per prompt, in prompt order)."""
    kwargs: dict[str, Any] = {"do_sample": False} if greedy else {
        "do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "num_return_sequences": samples}
    out = model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                         max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id,
                         **kwargs)
    return out[:, prompt_ids.shape[1]:]


def _grade_rows(new_tokens: torch.Tensor, records: Sequence[PromptRecord], per_prompt: int,
                tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Correct answers per prompt; each row is cut at its first eos before decoding."""
    correct = [0] * len(records)
    for row_index, row in enumerate(new_tokens.tolist()):
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        text = tokenizer.decode(row, skip_special_tokens=False)
        correct[row_index // per_prompt] += is_correct(text, records[row_index // per_prompt])
    return correct


def _run_prompts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 records: Sequence[PromptRecord], *, greedy: bool, samples: int,
                 max_new_tokens: int, chunk: int = 256) -> list[int]:
    """Correct counts per prompt, generating prompts of equal token length together (no padding)."""
    by_length: dict[int, list[int]] = {}
    encoded = [tokenizer.encode(r.prompt, add_special_tokens=False) for r in records]
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    counts = [0] * len(records)
    per_prompt = 1 if greedy else samples
    for indices in by_length.values():
        for lo in range(0, len(indices), chunk):
            part = indices[lo : lo + chunk]
            prompt_ids = torch.tensor([encoded[i] for i in part])
            new = _generate(model, prompt_ids, greedy=greedy, samples=samples,
                            max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_token_id,
                            pad_id=tokenizer.pad_token_id)
            for i, c in zip(part, _grade_rows(new, [records[i] for i in part], per_prompt, tokenizer),
                            strict=True):
                counts[i] = c
    return counts


def summarize(records: Sequence[PromptRecord], greedy_correct: list[int] | None,
              sample_correct: list[int] | None, samples: int) -> dict[str, Any]:
    """Overall and per-carry-count accuracy, pass@1 and the histogram of per-prompt pass counts."""
    carries = [count_carries(parse_operands(r.prompt)) for r in records]
    out: dict[str, Any] = {"num_prompts": len(records), "by_carries": {}}
    if greedy_correct is not None:
        out["greedy_accuracy"] = sum(greedy_correct) / len(records)
    if sample_correct is not None:
        out["pass_rates"] = {r.uid: c / samples for r, c in zip(records, sample_correct, strict=True)}
        out["mean_pass_rate"] = sum(sample_correct) / (samples * len(records))
        out["pass_count_histogram"] = [sample_correct.count(k) for k in range(samples + 1)]
    for k in sorted(set(carries)):
        rows = [i for i, c in enumerate(carries) if c == k]
        group: dict[str, Any] = {"num_prompts": len(rows)}
        if greedy_correct is not None:
            group["greedy_accuracy"] = sum(greedy_correct[i] for i in rows) / len(rows)
        if sample_correct is not None:
            group["mean_pass_rate"] = sum(sample_correct[i] for i in rows) / (samples * len(rows))
            group["pass_count_histogram"] = [sum(sample_correct[i] == n for i in rows) for n in range(samples + 1)]
        out["by_carries"][k] = group
    return out


@torch.no_grad()
def evaluate_hf_model(path: Path, records: Sequence[PromptRecord], *, greedy: bool, samples: int,
                      seed: int = 0, max_new_tokens: int = 16) -> dict[str, Any]:
    """Greedy accuracy (if `greedy`) and per-prompt pass rates over `samples` draws at temperature 1.

    Keys: num_prompts, greedy_accuracy, pass_rates {uid: rate}, mean_pass_rate (pass@1 at T=1),
    pass_count_histogram (prompts with 0..samples correct), by_carries {carries: the same per group},
    seconds. Grading is exact match on `\\boxed{answer}` (`toy_task.is_correct`).
    """
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    torch.manual_seed(seed)
    greedy_correct = sample_correct = None
    if greedy:
        greedy_correct = _run_prompts(model, tokenizer, records, greedy=True, samples=1,
                                      max_new_tokens=max_new_tokens)
    if samples > 0:
        sample_correct = _run_prompts(model, tokenizer, records, greedy=False, samples=samples,
                                      max_new_tokens=max_new_tokens)
    out = summarize(records, greedy_correct, sample_correct, samples)
    out["seconds"] = time.perf_counter() - start
    return out
