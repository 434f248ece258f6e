"""Held-out evaluation per set: greedy accuracy, and avg@k / pass@k from k samples per prompt.

Greedy accuracy (temperature 0, one response) is the toy's headline number and the trainer's
accuracy-vs-time curve. The papers report avg@k ("mean@k": the mean accuracy of k samples per
prompt at a temperature) and pass@k, here the unbiased estimator of Chen et al. (2021) from n
samples with c correct, 1 - C(n-c, k) / C(n, k). Both are computed per evaluation set, a set being
the prompts that share a `source` (a prepared file's dataset name, or the file's stem).

Generation goes through the run's `VLLMEngine` (one call for every prompt of every set) and grading
through the same sandboxed `RewardPool` as training, so evaluation sees exactly the rewards the
policy is trained on. Standalone use on an HF folder (a run's `runs/<name>/hf/<tag>` export, or a
Megatron checkpoint converted by tools/convert_megatron_to_hf.py):

    python -m megatron_speed.evaluate --model HF_DIR --data FILE[,FILE] --k 8 --temperature 0.6 --out result.json

Without `--max-new-tokens` the response budget is the largest that fits the longest prompt in the
model's context (at most 2048), so a small-context model (the toy's 64 positions) is evaluated as
is; a budget that leaves no room for any prompt is an error that names the largest one that fits.

Under SPMD every engine replica (rollout/replicas.py) evaluates a contiguous share of the prompts and
the per-prompt results are gathered, so every rank holds the whole report and the evaluation's time
shrinks with the number of replicas.

Deliberately left out: majority voting (maj@k) and per-prompt response dumps.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_speed.config.base import ConfigError
from megatron_speed.config.schema import EvalConfig
from megatron_speed.data.dataset import PROMPT_TOO_LONG, SkipReport
from megatron_speed.records import PromptRecord, SampleRequest
from megatron_speed.rewards.pool import RewardPool
from megatron_speed.rewards.scoring import score_groups
from megatron_speed.rollout.engine import VLLMEngine
from megatron_speed.rollout.replicas import ReplicaLayout, gather_shares

DEFAULT_MAX_NEW_TOKENS = 2048  # the CLI's cap on the default response budget (the papers' models: 4k context)
CPU_KV_CACHE_GIB = 0.5  # the CLI's default KV cache on CPU


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k responses drawn without replacement from n (c correct) is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass
class SetResult:
    """One evaluation set's numbers; `correct[uid]` counts the correct samples of each prompt."""

    name: str
    prompts: int
    greedy_accuracy: float | None = None
    k: int = 0
    avg_at_k: float | None = None
    pass_at: dict[int, float] = field(default_factory=dict)
    correct: dict[str, int] = field(default_factory=dict)

    @property
    def headline(self) -> tuple[str, float]:
        """The set's one number for curves and time-to-target: avg@k when sampled, else greedy accuracy."""
        if self.avg_at_k is not None:
            return f"avg@{self.k}", self.avg_at_k
        assert self.greedy_accuracy is not None  # evaluate_sets never leaves a set without a metric
        return "greedy", self.greedy_accuracy

    def scalars(self) -> dict[str, float]:
        out = {} if self.greedy_accuracy is None else {f"eval/{self.name}/accuracy": self.greedy_accuracy}
        if self.avg_at_k is not None:
            out[f"eval/{self.name}/avg@{self.k}"] = self.avg_at_k
        out.update({f"eval/{self.name}/pass@{j}": v for j, v in self.pass_at.items()})
        return out


@dataclass
class EvalReport:
    """Every set's result plus greedy accuracy over all prompts (the trainer's `eval/accuracy`)."""

    sets: dict[str, SetResult]
    greedy_accuracy: float | None
    settings: dict[str, Any]

    @property
    def pooled_accuracy(self) -> float:
        """Greedy accuracy over all prompts; without greedy decoding, the prompt-weighted mean of avg@k."""
        if self.greedy_accuracy is not None:
            return self.greedy_accuracy
        prompts = sum(r.prompts for r in self.sets.values())
        return sum(r.headline[1] * r.prompts for r in self.sets.values()) / max(prompts, 1)

    def scalars(self) -> dict[str, float]:
        out = {} if self.greedy_accuracy is None else {"eval/accuracy": self.greedy_accuracy}
        for result in self.sets.values():
            out.update(result.scalars())
        return out

    def to_json(self) -> dict[str, Any]:
        return {"settings": self.settings, "greedy_accuracy": self.greedy_accuracy,
                "sets": {name: dataclasses.asdict(r) for name, r in self.sets.items()}}


def by_set(records: Sequence[PromptRecord]) -> dict[str, list[PromptRecord]]:
    """Records grouped by `source`, in order of first appearance."""
    groups: dict[str, list[PromptRecord]] = defaultdict(list)
    for r in records:
        groups[r.source].append(r)
    return dict(groups)


def cap_per_set(records: Sequence[PromptRecord], max_prompts: int) -> list[PromptRecord]:
    """The first `max_prompts` records of every set (a small set is not crowded out by a big one)."""
    return [r for group in by_set(records).values() for r in group[:max_prompts]]


def resolve_files(cfg: EvalConfig) -> tuple[str, ...]:
    """`eval.files` as paths: a bare name without a suffix (`aime24`) is `<data_dir>/<name>.parquet`."""
    return tuple(f if Path(f).suffix else str(Path(cfg.data_dir) / f"{f}.parquet") for f in cfg.files)


def response_budget(prompt_tokens: Sequence[int], max_len: int, requested: int | None) -> tuple[int, list[bool]]:
    """Response tokens per prompt, and which prompts fit `max_len` positions with them.

    `requested` is used as given; by default (None) the budget is the largest that fits the longest
    prompt, capped at `DEFAULT_MAX_NEW_TOKENS`, so every readable prompt is evaluated whatever the
    model's context."""
    budget = requested if requested is not None else min(DEFAULT_MAX_NEW_TOKENS, max_len - max(prompt_tokens))
    return budget, [n + budget <= max_len for n in prompt_tokens]


def no_room_message(prompt_tokens: Sequence[int], max_len: int, requested: int) -> str:
    """Why no prompt fits `requested` response tokens, and the largest value that would."""
    shortest, longest = min(prompt_tokens), max(prompt_tokens)
    return (f"--max-new-tokens {requested} leaves no room for any prompt: the model's context is {max_len} "
            f"positions (max_position_embeddings, or --max-model-len) and the prompts have {shortest}..{longest} "
            f"tokens. The largest --max-new-tokens that fits a prompt is {max_len - shortest}, and "
            f"{max_len - longest} fits them all (the default when --max-new-tokens is not given)")


@contextlib.contextmanager
def sampling(engine: VLLMEngine, *, temperature: float, top_p: float) -> Iterator[None]:
    """Sample at the evaluation temperature/top_p for the duration; the rollout settings come back after.

    The engine builds its sampling parameters from `engine.cfg` on every call, so the evaluation
    reuses the training engine (and its weights) rather than building a second one."""
    saved = engine.cfg
    engine.cfg = dataclasses.replace(saved, temperature=temperature, top_p=top_p)
    try:
        yield
    finally:
        engine.cfg = saved


def greedy_correct(engine: VLLMEngine, pool: RewardPool, records: Sequence[PromptRecord]) -> list[bool]:
    if not records:
        return []
    texts = engine.generate_greedy(records)
    result = pool.score([(text, r.answer) for text, r in zip(texts, records)])
    return [s > 0 for s in result.scores]


def sampled_correct(engine: VLLMEngine, pool: RewardPool, records: Sequence[PromptRecord], *, k: int,
                    temperature: float, top_p: float, policy_version: int = 0) -> list[int]:
    """Correct responses among `k` samples of every record, in record order (one engine call)."""
    requests = [SampleRequest(prompt=r, n=k, phase="eval") for r in records]
    with sampling(engine, temperature=temperature, top_p=top_p):
        groups = engine.generate(requests, policy_version=policy_version)
    score_groups(pool, groups)
    return [sum(reward > 0 for reward in g.rewards) for g in groups]


def evaluate_sets(engine: VLLMEngine, pool: RewardPool, records: Sequence[PromptRecord], *, k: int,
                  temperature: float, top_p: float, pass_ks: Sequence[int] = (), greedy: bool = True,
                  policy_version: int = 0, replicas: ReplicaLayout | None = None,
                  k_by_set: Mapping[str, int] | None = None) -> EvalReport:
    """Greedy accuracy (if `greedy`) and avg@k and pass@j per set, k being `k_by_set[set]` or `k`
    (0: greedy only for that set); j runs over `pass_ks`, or just k when `pass_ks` is empty.

    One engine call per distinct k. With `replicas`, each engine replica evaluates its share of the
    prompts and every rank gets all results."""
    set_k = {r.source: (k_by_set or {}).get(r.source, k) for r in records}
    if not greedy and not all(set_k.values()):
        empty = sorted(name for name, kk in set_k.items() if not kk)
        raise ValueError(f"nothing to evaluate for {', '.join(empty)}: greedy is off and k < 1 there "
                         "(set eval.k / eval.k_by_set >= 1 for every set, or turn eval.greedy on)")
    for name, kk in set_k.items():
        if kk and any(not 1 <= j <= kk for j in pass_ks):
            raise ValueError(f"pass@j needs 1 <= j <= k (k={kk} for set {name!r}), got {tuple(pass_ks)}")

    def spread(fn: Callable[[Sequence[PromptRecord]], list[Any]], recs: Sequence[PromptRecord]) -> list[Any]:
        if replicas is None or replicas.world_size == 1:
            return fn(recs)
        return gather_shares(replicas, fn(replicas.local(recs)))

    greedy_ok = spread(lambda rs: greedy_correct(engine, pool, rs), records) if greedy else None
    counts: dict[int, int] = {}  # position in `records` -> correct samples
    for kk in sorted({kk for kk in set_k.values() if kk}):
        index = [i for i, r in enumerate(records) if set_k[r.source] == kk]
        counts.update(zip(index, spread(lambda rs, kk=kk: sampled_correct(
            engine, pool, rs, k=kk, temperature=temperature, top_p=top_p, policy_version=policy_version),
            [records[i] for i in index])))
    members: dict[str, list[int]] = defaultdict(list)  # set name -> positions in `records`
    for i, r in enumerate(records):
        members[r.source].append(i)
    sets: dict[str, SetResult] = {}
    for name, index in members.items():
        kk = set_k[name]
        result = SetResult(name=name, prompts=len(index), k=kk)
        if greedy_ok is not None:
            result.greedy_accuracy = sum(greedy_ok[i] for i in index) / len(index)
        if kk:
            result.correct = {records[i].uid: counts[i] for i in index}
            result.avg_at_k = sum(counts[i] for i in index) / (kk * len(index))
            result.pass_at = {j: sum(pass_at_k(kk, counts[i], j) for i in index) / len(index)
                              for j in (pass_ks or (kk,))}
        sets[name] = result
    overall = sum(greedy_ok) / max(len(records), 1) if greedy_ok is not None else None
    settings = {"k": k, "k_by_set": dict(k_by_set or {}), "temperature": temperature, "top_p": top_p,
                "pass_at": list(pass_ks), "max_new_tokens": engine.cfg.max_new_tokens, "prompts": len(records)}
    return EvalReport(sets=sets, greedy_accuracy=overall, settings=settings)


def run_eval(engine: VLLMEngine, pool: RewardPool, records: Sequence[PromptRecord], cfg: EvalConfig, *,
             policy_version: int = 0, replicas: ReplicaLayout | None = None) -> EvalReport:
    """The trainer's evaluation: greedy unless `eval.greedy` is off, sampled metrics as `eval.k` asks."""
    return evaluate_sets(engine, pool, records, k=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p,
                         pass_ks=cfg.pass_at, greedy=cfg.greedy, policy_version=policy_version, replicas=replicas,
                         k_by_set=cfg.set_k())


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_speed.evaluate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Greedy accuracy, avg@k and pass@k of an HF model folder on prepared prompt files.",
        epilog="--model is an HF folder: a run's export under runs/<name>/hf/<tag>, or a Megatron "
               "checkpoint converted with tools/convert_megatron_to_hf.py. --data files are .jsonl/.parquet "
               "with id, prompt, answer[, source] (examples/data_preprocess/prepare.py writes them); "
               "each source is reported as its own set.")
    parser.add_argument("--model", required=True, type=Path, help="HF model folder (config, weights, tokenizer)")
    parser.add_argument("--data", required=True, help="comma-separated prompt files")
    parser.add_argument("--k", type=int, default=8, help="samples per prompt for avg@k / pass@k (0 = greedy only)")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--pass-at", default="", help="comma-separated j for pass@j (default: each set's k)")
    parser.add_argument("--k-by-set", default="", help="comma-separated SET=K overriding --k for one set, "
                        "e.g. aime24=16,math500=1 (a set is a source name)")
    parser.add_argument("--no-greedy", action="store_true", help="skip the greedy pass")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="response tokens per prompt (default: the largest that fits the longest prompt in the "
                             f"model's context, at most {DEFAULT_MAX_NEW_TOKENS})")
    parser.add_argument("--max-model-len", type=int, default=0, help="0 = the model's max_position_embeddings")
    parser.add_argument("--max-prompts", type=int, default=0, help="first N prompts of each set (0 = all)")
    parser.add_argument("--grader", default="math_verify", help="a name in rewards.GRADERS or module:function")
    parser.add_argument("--workers", type=int, default=2, help="grader processes")
    parser.add_argument("--grader-timeout", type=float, default=5.0, help="seconds per graded response")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    parser.add_argument("--kv-cache-gib", type=float, default=None,
                        help=f"explicit KV-cache size; 0 = size it from --gpu-memory-utilization (default: 0 on a GPU, "
                             f"{CPU_KV_CACHE_GIB} on CPU, where vLLM would otherwise take that share of all RAM)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results (default: print only)")
    args = parser.parse_args(list(argv))
    args.pass_at = tuple(int(j) for j in args.pass_at.split(",") if j)
    if args.k < 0:
        parser.error(f"--k must be >= 0, got {args.k}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens} (omit it to fit the model)")
    try:  # the same rules as the trainer's eval.k / eval.k_by_set / eval.pass_at
        args.k_by_set = EvalConfig(k=args.k, pass_at=args.pass_at,
                                   k_by_set=tuple(e for e in args.k_by_set.split(",") if e)).set_k()
    except ConfigError as err:
        parser.error(f"--k-by-set / --pass-at: {err}")
    if args.no_greedy and args.k < 1 and not any(args.k_by_set.values()):
        parser.error("--no-greedy needs --k >= 1: nothing would be evaluated")
    return args


def load_prompts(args: argparse.Namespace, max_len: int) -> tuple[list[PromptRecord], SkipReport, int]:
    """The prompt files' records that fit the context with the response budget, the skip report and
    the budget (`response_budget`); ValueError when no prompt fits, naming the cause and the fix."""
    from transformers import AutoTokenizer

    from megatron_speed.data import read_many

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    files = [f for f in args.data.split(",") if f]
    records, skipped = read_many(files, count_tokens=lambda s: len(tokenizer.encode(s)), max_prompt_tokens=max_len - 1)
    if not records:
        raise ValueError(f"no usable prompts in {', '.join(files)}: {skipped.summary()}")
    lengths = [len(tokenizer.encode(r.prompt)) for r in records]
    budget, fits = response_budget(lengths, max_len, args.max_new_tokens)
    if not any(fits):
        raise ValueError(no_room_message(lengths, max_len, budget))
    dropped = fits.count(False)
    if dropped:  # counted like the reader's own too-long prompts
        skipped.counts[PROMPT_TOO_LONG] = skipped.counts.get(PROMPT_TOO_LONG, 0) + dropped
        skipped.kept -= dropped
    records = [r for r, ok in zip(records, fits) if ok]
    return (cap_per_set(records, args.max_prompts) if args.max_prompts else records), skipped, budget


def kv_cache_gib(args: argparse.Namespace) -> float:
    """--kv-cache-gib, or its default: vLLM's own sizing on a GPU, a small fixed cache on CPU."""
    import torch

    if args.kv_cache_gib is not None:
        return float(args.kv_cache_gib)
    return 0.0 if torch.cuda.is_available() else CPU_KV_CACHE_GIB


def main(argv: Sequence[str] | None = None) -> int:
    import json
    import sys

    from transformers import AutoConfig

    from megatron_speed.config.schema import RolloutConfig

    args = parse_args(sys.argv[1:] if argv is None else argv)
    max_len = int(AutoConfig.from_pretrained(args.model).max_position_embeddings)
    max_len = min(max_len, args.max_model_len) if args.max_model_len else max_len
    try:
        records, skipped, budget = load_prompts(args, max_len)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"prompts: {skipped.summary()}", file=sys.stderr)
    if args.max_new_tokens is None:
        print(f"max new tokens: {budget} (the longest prompt's room in the model's {max_len} positions, at most "
              f"{DEFAULT_MAX_NEW_TOKENS}; set --max-new-tokens to choose)", file=sys.stderr)
    rollout = RolloutConfig(n=max(args.k, 1), temperature=args.temperature, top_p=args.top_p,
                            max_new_tokens=budget, tensor_parallel_size=args.tensor_parallel_size,
                            gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_gib=kv_cache_gib(args),
                            seed=args.seed)
    with (VLLMEngine(args.model, rollout, max_model_len=max_len, seed=args.seed) as engine,
          RewardPool(args.grader, args.workers, args.grader_timeout) as pool):
        report = evaluate_sets(engine, pool, records, k=args.k, temperature=args.temperature, top_p=args.top_p,
                               pass_ks=args.pass_at, greedy=not args.no_greedy, k_by_set=args.k_by_set)
    result = {"model": str(args.model), "data": [f for f in args.data.split(",") if f],
              "skipped_rows": skipped.counts, **report.to_json()}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    for name, value in report.scalars().items():
        print(f"{name:40s} {value:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
