"""The run's config tree: one small section per component, the whole run is `Config`.

Sections hold plain values only (paths, numbers, names); runtime objects such as process groups,
models and tokenizers are built from them by the components and never stored here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from megatron_speed.config.base import Section, require
from megatron_speed.config.model import (  # noqa: F401  (re-exported: the tree's sections live here)
    LORA_TARGETS,
    LoraConfig,
    ModelConfig,
    ParallelConfig,
    WarmupConfig,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig(Section):
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 1234
    steps: int = 100  # RL steps (optimizer updates happen inside each step)
    max_wall_seconds: float = 0.0  # 0 = no limit; otherwise stop after the first step past it
    save_hf_every: int = 0  # write an HF-format copy of the policy every K steps (0 = only at the end)
    # Exact-resume checkpoints (model, optimizer, LR schedule, trainer state) under <run dir>/checkpoints.
    save_every: int = 0  # write one every K steps; 0 = never
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted once a newer one is complete
    resume: str = "auto"  # "auto": latest complete checkpoint of this run, if any | "": start fresh | a path

    def check(self) -> None:
        require(self.steps >= 1, "steps", self.steps, "must be >= 1", "set run.steps to a positive count")
        require(self.max_wall_seconds >= 0, "max_wall_seconds", self.max_wall_seconds, "must be >= 0",
                "use 0 for no limit")
        require(self.save_hf_every >= 0, "save_hf_every", self.save_hf_every, "must be >= 0",
                "use 0 to save only at the end")
        require(self.save_every >= 0, "save_every", self.save_every, "must be >= 0",
                "use 0 to write no resumable checkpoints")
        require(self.keep_last >= 1, "keep_last", self.keep_last, "must be >= 1",
                "keep at least the newest checkpoint (set run.save_every=0 to write none)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToyTaskConfig(Section):
    """The embedded arithmetic task: sums of `num_operands` numbers of 1..`max_digits` digits.

    Each operand's digit count is uniform in 1..max_digits; the held-out split holds `eval_size`
    distinct prompts and the train split never contains one of them (it may repeat its own)."""

    max_digits: int = 4
    num_operands: int = 2
    train_size: int = 20000
    eval_size: int = 512
    seed: int = 0

    def check(self) -> None:
        require(1 <= self.max_digits <= 9, "max_digits", self.max_digits, "must be in 1..9",
                "pick an operand width between 1 and 9 digits")
        require(2 <= self.num_operands <= 4, "num_operands", self.num_operands, "must be in 2..4",
                "pick 2, 3 or 4 operands")
        require(self.train_size >= 1 and self.eval_size >= 1, "train_size", self.train_size,
                "and eval_size must be >= 1", "give both splits at least one prompt")
        distinct = 10 ** (self.max_digits * self.num_operands)
        require(2 * self.eval_size <= distinct, "eval_size", self.eval_size,
                f"must be at most half of the {distinct} distinct prompts of this task",
                "lower toy.eval_size or raise toy.max_digits")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig(Section):
    """Prompt files (jsonl or parquet with id, prompt, answer[, source]) or the toy task.

    With `toy` set, the toy task generates a train and a held-out split; files given here REPLACE
    the generated split of their kind (`train_files` the train split, `eval_files` the held-out
    one), so `data.train_files=[my.jsonl]` trains on that file alone. `eval.files` add sets."""

    train_files: tuple[str, ...] = ()
    eval_files: tuple[str, ...] = ()
    toy: ToyTaskConfig | None = None
    strict: bool = False  # True: a bad row stops the run with its file and row; False: skip + count
    # A named prompt template (data/templates.py) applied to every train and held-out prompt as it is
    # read, e.g. "qwen-math" (JSPO's system turn); "" = the prepared prompt text as is.
    prompt_template: str = ""
    shuffle: bool = True

    def check(self) -> None:
        from megatron_speed.data.templates import PROMPT_TEMPLATES

        require(not self.prompt_template or self.prompt_template in PROMPT_TEMPLATES, "prompt_template",
                self.prompt_template, f"is not a known template ({', '.join(sorted(PROMPT_TEMPLATES))})",
                "use one of those names, or \"\" for the prepared prompt as is")
        require(bool(self.train_files) or self.toy is not None, "train_files", self.train_files,
                "is empty and no toy task is configured", "set data.train_files=[path.jsonl] or use the toy_cpu recipe")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutConfig(Section):
    n: int = 8  # responses per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 16
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.3
    kv_cache_gib: float = 0.0  # explicit KV-cache size; 0 = size it from gpu_memory_utilization
    enforce_eager: bool = True
    seed: int = 0
    refit_bucket_mb: float = 512.0  # refit loads weights in buckets of at most this many MiB (bigger tensors alone)
    # Where the engines run. "colocated": every rank holds an actor shard and an engine shard, and the
    # phases alternate. "disaggregated": the last `num_ranks` ranks of the world run the engines (and the
    # curriculum beside them), the others the actor; the two overlap, `max_staleness` bounding the lag.
    placement: Literal["colocated", "disaggregated"] = "colocated"
    num_ranks: int = 0  # engine ranks in disaggregated mode (a multiple of tensor_parallel_size); 0 when colocated
    # Disaggregated only. N >= 1 is a hard bound: no trained sample is more than N policy versions older
    # than the weights it trains (the engines wait rather than run further ahead). 0 = synchronous,
    # exactly the colocated loop, ages included (no bound): SPEED's screening samples are one version
    # old and buffered groups older, as far as curriculum.max_staleness allows.
    max_staleness: int = 0

    def check(self) -> None:
        require(self.n >= 1, "n", self.n, "must be >= 1", "sample at least one response per prompt")
        require(self.temperature > 0, "temperature", self.temperature,
                "must be > 0 for RL sampling (vLLM treats 0 as greedy, which only allows n=1)",
                "use 1.0, the papers' setting")
        require(0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]", "use 1.0")
        require(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "must be >= 1",
                "allow at least one response token")
        require(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization",
                self.gpu_memory_utilization, "must be in (0, 1]", "use 0.3 on CPU, 0.6 on a shared GPU")
        require(self.kv_cache_gib >= 0, "kv_cache_gib", self.kv_cache_gib, "must be >= 0",
                "use 0 to size the KV cache from gpu_memory_utilization")
        require(self.tensor_parallel_size >= 1, "tensor_parallel_size", self.tensor_parallel_size, "must be >= 1",
                "use 1, or a divisor of the number of processes to shard each engine replica")
        require(self.refit_bucket_mb > 0, "refit_bucket_mb", self.refit_bucket_mb, "must be > 0",
                "use e.g. 512 (MiB of weights per refit bucket)")
        disaggregated = self.placement == "disaggregated"
        require(not disaggregated or self.num_ranks >= 1, "num_ranks", self.num_ranks,
                "must be >= 1 with rollout.placement=disaggregated", "give the engines e.g. rollout.num_ranks=1")
        require(disaggregated or self.num_ranks == 0, "num_ranks", self.num_ranks,
                "only applies to rollout.placement=disaggregated (colocated engines share every rank)",
                "set rollout.placement=disaggregated or rollout.num_ranks=0")
        require(not disaggregated or self.num_ranks % self.tensor_parallel_size == 0, "num_ranks", self.num_ranks,
                f"must be a multiple of rollout.tensor_parallel_size ({self.tensor_parallel_size})",
                "give each engine replica whole ranks")
        require(self.max_staleness >= 0, "max_staleness", self.max_staleness, "must be >= 0",
                "use 0 (synchronous) or e.g. 1 (one step of overlap)")
        require(disaggregated or self.max_staleness == 0, "max_staleness", self.max_staleness,
                "needs rollout.placement=disaggregated: colocated engines share the devices with the actor and "
                "cannot run ahead of it", "set rollout.placement=disaggregated rollout.num_ranks=K, or max_staleness=0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CurriculumConfig(Section):
    """Which prompts each step trains on, and how many generation calls may be spent finding them.

    "none": every sampled prompt, `prompts_per_step` of them, `rollout.n` responses each.
    "speed": SPEED-RL. Each generation call screens `screen_prompts_per_call` new prompts with
    `n_init` responses and continues every prompt accepted by the previous call (0 < pass rate < 1)
    with `n_continue` more; a step trains on `prompts_per_step` groups of `n_init + n_continue`
    responses (the screening responses are reused, as published). `rollout.n` is not used.
    "dapo": DAPO dynamic sampling. Each call samples `dapo_prompts_per_call` prompts with `rollout.n`
    responses and keeps the groups whose rewards are not all equal. `dapo_surplus` says what happens
    to the kept groups beyond `prompts_per_step`: "keep" buffers them for the next steps (ours: no
    generated sample is wasted, at one policy version of staleness) or "discard" drops them as verl's
    DAPO trainer does (every trained group is from the current policy; the paper baselines use it).
    """

    name: Literal["none", "speed", "dapo"] = "none"
    prompts_per_step: int = 32
    n_init: int = 4  # SPEED screening responses per prompt
    n_continue: int = 20  # SPEED continuation responses per accepted prompt (may equal n_init)
    screen_prompts_per_call: int = 128  # SPEED: new prompts screened per call (paper: 64 for 16/step)
    max_staleness: int = 0  # 0 = unlimited; else drop buffered groups more policy versions old than this
    dapo_prompts_per_call: int = 96  # DAPO: prompts sampled per call (verl's gen_batch_size)
    dapo_surplus: Literal["keep", "discard"] = "keep"  # DAPO: kept groups beyond the batch (see above)
    max_calls_per_step: int = 50  # generation calls in a row without a batch before an error; 0 = no limit
    warn_after_calls: int = 5  # warn every this many calls without a batch; 0 = never

    def samples_per_prompt(self, rollout_n: int) -> int:
        """Responses per trained group: n_init + n_continue for SPEED, `rollout.n` otherwise."""
        return self.n_init + self.n_continue if self.name == "speed" else rollout_n

    def check(self) -> None:
        require(self.prompts_per_step >= 1, "prompts_per_step", self.prompts_per_step, "must be >= 1",
                "train on at least one prompt per step")
        require(self.n_init >= 2, "n_init", self.n_init,
                "must be >= 2: with one screening response the pass rate is 0 or 1 and no prompt is accepted",
                "use 4, the paper's setting")
        require(self.n_continue >= 1, "n_continue", self.n_continue, "must be >= 1",
                "use 20, the paper's setting (n_continue may equal n_init)")
        require(self.screen_prompts_per_call >= 1, "screen_prompts_per_call", self.screen_prompts_per_call,
                "must be >= 1", "screen e.g. 4 x prompts_per_step new prompts per call, as the paper")
        require(self.max_staleness >= 0, "max_staleness", self.max_staleness, "must be >= 0",
                "use 0 to keep buffered groups however old they are")
        require(self.dapo_prompts_per_call >= 1, "dapo_prompts_per_call", self.dapo_prompts_per_call,
                "must be >= 1", "sample e.g. 3 x prompts_per_step prompts per call, as DAPO")
        require(self.max_calls_per_step >= 0, "max_calls_per_step", self.max_calls_per_step, "must be >= 0",
                "use 0 for no limit or e.g. 50")
        require(self.name != "speed" or self.max_calls_per_step != 1, "max_calls_per_step",
                self.max_calls_per_step, "must be 0 or >= 2 for SPEED, whose first batch needs a screening "
                "call and a continuation call", "use e.g. 50")
        require(self.warn_after_calls >= 0, "warn_after_calls", self.warn_after_calls, "must be >= 0",
                "use 0 to never warn or e.g. 5")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardConfig(Section):
    grader: str = "math_verify"  # a name in rewards.GRADERS or "module:function"
    num_workers: int = 2
    timeout_seconds: float = 5.0

    def check(self) -> None:
        require(self.num_workers >= 1, "num_workers", self.num_workers, "must be >= 1",
                "use at least one grader process")
        require(self.timeout_seconds > 0, "timeout_seconds", self.timeout_seconds, "must be > 0",
                "give each answer a positive grading time, e.g. 5")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AlgorithmConfig(Section):
    """Advantage estimator, policy loss and reward shaping (formulas: algorithms/)."""

    advantage: Literal["rloo", "grpo", "drgrpo", "js"] = "rloo"
    js_lambda_variant: Literal["code", "paper"] = "code"  # "paper" adds the (n-1)/n factor
    grpo_eps: float = 1e-6
    clip_low: float = 0.2
    clip_high: float = 0.2  # DAPO clip-higher: 0.28
    clip_c: float | None = None  # dual-clip cap for negative advantages (verl's clip_ratio_c; SPEED used 10)
    loss_aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                              "seq-mean-token-sum-norm"] = "token-mean"
    kl_coef: float = 0.0  # penalty to the initial (reference) policy; 0 = no reference model is built
    kl_kind: Literal["k1", "k3"] = "k3"
    entropy_coef: float = 0.0
    overlong_buffer_length: int = 0  # DAPO overlong shaping over the last N tokens; 0 = off
    overlong_factor: float = 1.0
    # Off-policy correction of the policy-gradient loss for samples the engine drew (a different kernel,
    # precision or, when disaggregated, an older policy version): algorithms/corrections.py. With
    # rho = exp(actor_old_logp - engine_logp) per token, "tis" weights each token by min(rho, is_cap);
    # "icepop" by rho where 1/is_beta <= rho <= is_beta, else 0; "seq_mis" every token of a response by
    # its geometric-mean rho where that lies in [1/is_beta, is_beta], else 0; "decoupled" (AReaL's
    # decoupled PPO: the clip around the proximal policy = the actor's recomputed log-probs) by rho
    # where rho <= is_cap, else 0.
    is_correction: Literal["none", "tis", "icepop", "seq_mis", "decoupled"] = "none"
    is_cap: float = 2.0  # "tis": truncation cap (verl's and slime's default 2); "decoupled": masking cap
    is_beta: float = 2.0  # "icepop", "seq_mis": keep ratios in [1/is_beta, is_beta]

    @property
    def estimator_options(self) -> dict[str, Any]:
        """Options for the per-sample estimators (js goes through the fused kernel's own signature)."""
        return {"grpo": {"eps": self.grpo_eps}}.get(self.advantage, {})

    def check(self) -> None:
        require(0 < self.clip_low < 1, "clip_low", self.clip_low, "must be in (0, 1)", "use 0.2")
        require(self.clip_high > 0, "clip_high", self.clip_high, "must be > 0", "use 0.2 (0.28 for DAPO)")
        require(self.clip_c is None or self.clip_c > 1, "clip_c", self.clip_c, "must be > 1 or null",
                "use 3 (verl's default), 10 (SPEED scripts) or null to turn dual-clip off")
        require(self.kl_coef >= 0, "kl_coef", self.kl_coef, "must be >= 0", "use 0 (off) or e.g. 0.001")
        require(self.entropy_coef >= 0, "entropy_coef", self.entropy_coef, "must be >= 0", "use 0 (off)")
        require(self.overlong_buffer_length >= 0, "overlong_buffer_length", self.overlong_buffer_length,
                "must be >= 0", "use 0 to turn overlong shaping off")
        require(self.is_cap >= 1, "is_cap", self.is_cap, "must be >= 1 (a cap below 1 down-weights every "
                "on-policy token)", "use 2 (verl's and slime's TIS default)")
        require(self.is_beta > 1, "is_beta", self.is_beta, "must be > 1 (the kept band is [1/is_beta, is_beta])",
                "use e.g. 2")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig(Section):
    lr: float = 1e-4
    min_lr: float = 1e-4
    lr_warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    clip_grad: float = 1.0
    mini_batch_size: int = 256  # trajectories per optimizer step
    # What one step of the LR schedule (warm-up, decay) counts: "optimizer_step" (megatron's own
    # convention) or "rl_step" (verl's: its scheduler steps once per RL step, however many optimizer
    # updates the step makes; the paper recipes use it).
    lr_schedule_unit: Literal["optimizer_step", "rl_step"] = "optimizer_step"
    micro_batch_size: int = 64  # trajectories per forward/backward
    micro_batch_tokens: int = 0  # dynamic batching: rows x padded length per micro-batch; 0 = micro_batch_size rows
    # Sequence packing: sequences laid end to end in one row of at most micro_batch_tokens tokens per
    # micro-batch (THD, cu_seqlens), binned to balance tokens over data-parallel ranks (actor/packing.py).
    pack_sequences: bool = False
    use_distributed_optimizer: bool = False  # megatron's ZeRO-1: optimizer state sharded over data parallelism

    def check(self) -> None:
        require(self.micro_batch_tokens >= 0, "micro_batch_tokens", self.micro_batch_tokens, "must be >= 0",
                "use 0 for fixed micro_batch_size rows, or a token budget such as 8192")
        require(not self.pack_sequences or self.micro_batch_tokens > 0, "pack_sequences", self.pack_sequences,
                "needs a token budget per packed row (optim.micro_batch_tokens > 0)",
                "set optim.micro_batch_tokens, e.g. 16384, or optim.pack_sequences=false")
        require(self.lr > 0, "lr", self.lr, "must be > 0", "use e.g. 1e-6 at scale, 1e-4 on the toy")
        require(0 <= self.min_lr <= self.lr, "min_lr", self.min_lr, f"must be in [0, lr={self.lr}]",
                "set optim.min_lr <= optim.lr")
        require(self.micro_batch_size >= 1, "micro_batch_size", self.micro_batch_size, "must be >= 1",
                "use at least one trajectory per micro-batch")
        require(self.mini_batch_size % self.micro_batch_size == 0, "mini_batch_size",
                self.mini_batch_size, f"must be a multiple of micro_batch_size ({self.micro_batch_size})",
                "make optim.mini_batch_size a multiple of optim.micro_batch_size")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig(Section):
    """Held-out evaluation, per set: greedy accuracy always; avg@k and pass@k when `k` >= 1.

    The sets are `data.eval_files` (plus the toy's held-out split) and `files`, each reported under
    its rows' `source` (a prepared file's dataset name, else the file's stem) and capped at
    `max_prompts` prompts. An entry of `files` is a path, or a prepared name such as `aime24`, read
    from `<data_dir>/aime24.parquet` (examples/data_preprocess/prepare.py writes those). With `k` >= 1
    every prompt gets `k` samples at `temperature`/`top_p`: avg@k is their mean accuracy and pass@j
    the unbiased estimate 1 - C(k-c, j)/C(k, j) for each j in `pass_at` (default: j = k)."""

    every: int = 10  # steps; 0 = only before and after training
    max_prompts: int = 512  # per evaluation set
    files: tuple[str, ...] = ()
    data_dir: str = "data"
    k: int = 0  # samples per prompt for avg@k / pass@k; 0 = greedy accuracy only (the toy's default)
    temperature: float = 0.6
    top_p: float = 0.95
    pass_at: tuple[int, ...] = ()  # the j of pass@j; empty = (k,) per set
    k_by_set: tuple[str, ...] = ()  # "set=K" entries overriding k for one set, e.g. ("aime24=16", "math500=1")
    # Greedy decoding of every held-out prompt. The papers sample only (their mean@k at T = 1.0), so
    # their recipes turn it off; a sampled set's headline metric is then its avg@k.
    greedy: bool = True
    # "SET=ACC" entries: report the RL seconds and step at which SET's headline metric (avg@k when
    # sampled, else greedy accuracy) first reaches ACC (metrics/targets.py), in summary.json's
    # `time_to_target`. "A+B=ACC" targets the mean of several sets, e.g. "aime24+aime25=0.18".
    targets: tuple[str, ...] = ()

    def set_k(self) -> dict[str, int]:
        """`k_by_set` as {set name: k} (validated by `check`)."""
        return {name.strip(): int(kk) for name, kk in (entry.rsplit("=", 1) for entry in self.k_by_set)}

    def target_map(self) -> dict[str, float]:
        """`targets` as {set name or "a+b": target accuracy} (validated by `check`)."""
        return {"+".join(p.strip() for p in name.split("+")): float(acc)
                for name, acc in (entry.rsplit("=", 1) for entry in self.targets)}

    def check(self) -> None:
        require(self.every >= 0, "every", self.every, "must be >= 0", "use 0 to evaluate only at the ends")
        require(self.max_prompts >= 1, "max_prompts", self.max_prompts, "must be >= 1",
                "evaluate on at least one prompt")
        require(self.k >= 0, "k", self.k, "must be >= 0", "use 0 for greedy accuracy only, or e.g. 8")
        require(self.temperature > 0, "temperature", self.temperature,
                "must be > 0: k samples at temperature 0 would all be the greedy answer",
                "use 0.6 (the papers' evaluation) or 1.0")
        require(0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]", "use 0.95 or 1.0")
        for entry in self.k_by_set:
            name, _, kk = entry.rpartition("=")
            require(bool(name.strip()) and kk.isdigit(), "k_by_set", self.k_by_set,
                    f"entry {entry!r} is not SET=K", "write entries like aime24=16 (K >= 0; 0 = greedy only)")
        for entry in self.targets:
            self._check_target(entry)
        require(len(self.target_map()) == len(self.targets), "targets", self.targets, "names a set twice",
                "keep one target per set (or per A+B mean)")
        require(self.greedy or self.k >= 1, "greedy", self.greedy,
                "is off while eval.k = 0: a set without samples would have no metric at all",
                "set eval.k >= 1 (or eval.greedy=true)")
        ks = [kk for kk in (self.k, *self.set_k().values()) if kk]
        require(all(1 <= j <= min(ks, default=0) for j in self.pass_at), "pass_at", self.pass_at,
                f"must hold values in 1..k for every sampled set (smallest k = {min(ks, default=0)})",
                "raise eval.k / eval.k_by_set or drop the larger values")

    def _check_target(self, entry: str) -> None:
        name, _, acc = entry.rpartition("=")
        fix = "write entries like math500=0.8 or aime24+aime25=0.18 (an accuracy in (0, 1])"
        require(bool(name) and all(p.strip() for p in name.split("+")), "targets", self.targets,
                f"entry {entry!r} is not SET=ACC or SET+SET=ACC", fix)
        try:
            value = float(acc)
        except ValueError:
            value = float("nan")
        require(0 < value <= 1, "targets", self.targets, f"entry {entry!r} has no accuracy in (0, 1]", fix)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MetricsConfig(Section):
    tensorboard: bool = True
    progress_bar: bool = True
    plot: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(Section):
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    curriculum: CurriculumConfig = dataclasses.field(default_factory=CurriculumConfig)
    rewards: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = dataclasses.field(default_factory=AlgorithmConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)

    @property
    def trajectories_per_step(self) -> int:
        return self.curriculum.prompts_per_step * self.curriculum.samples_per_prompt(self.rollout.n)

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates per RL step (validated: the mini-batch divides the step's trajectories)."""
        return self.trajectories_per_step // self.optim.mini_batch_size

    @property
    def schedule_steps(self) -> int:
        """Length of the LR schedule in its own unit (`optim.lr_schedule_unit`) for `run.steps` RL steps."""
        per_step = 1 if self.optim.lr_schedule_unit == "rl_step" else self.updates_per_step
        return self.run.steps * per_step

    def _check_packing(self) -> None:
        """What packing and context parallelism need from the other sections."""
        cp, optim = self.parallel.context_parallel_size, self.optim
        require(cp == 1 or optim.pack_sequences, "parallel.context_parallel_size", cp,
                "needs packed sequences (the CP split is per packed sequence)",
                "set optim.pack_sequences=true with an optim.micro_batch_tokens budget, or context_parallel_size=1")
        require(cp == 1 or optim.micro_batch_tokens % (2 * cp) == 0, "optim.micro_batch_tokens",
                optim.micro_batch_tokens, f"must be a multiple of 2 x parallel.context_parallel_size (= {2 * cp}): "
                "each packed sequence is padded to 2 x CP chunks", f"use a multiple of {2 * cp}")
        require(not optim.pack_sequences or self.model.attention_backend != "local", "model.attention_backend",
                self.model.attention_backend, "'local' (megatron's DotProductAttention) cannot attend over packed "
                "sequences", "use 'sdpa', 'te' or 'auto'")

    def check(self) -> None:
        cur = self.curriculum
        # Mini-batches are counted in trajectories, so SPEED (n_init + n_continue per prompt) and a
        # baseline with rollout.n = n_init + n_continue take the same optimizer steps per RL step.
        batch = self.trajectories_per_step
        formula = ("curriculum.prompts_per_step x (curriculum.n_init + curriculum.n_continue)"
                   if cur.name == "speed" else "curriculum.prompts_per_step x rollout.n")
        require(batch % self.optim.mini_batch_size == 0, "optim.mini_batch_size", self.optim.mini_batch_size,
                f"must divide the trajectories per step ({formula} = {batch})",
                "pick a mini-batch size that divides it")
        require(cur.name == "speed" or self.rollout.n >= 2 or self.algorithm.advantage not in ("rloo",),
                "rollout.n", self.rollout.n, "must be >= 2 for a leave-one-out baseline",
                "set rollout.n=2 or more")
        require(cur.name != "dapo" or self.rollout.n >= 2, "rollout.n", self.rollout.n,
                "must be >= 2 for DAPO dynamic sampling (one response has no reward spread)",
                "set rollout.n=2 or more")
        require(self.algorithm.overlong_buffer_length <= self.rollout.max_new_tokens,
                "algorithm.overlong_buffer_length", self.algorithm.overlong_buffer_length,
                f"must be <= rollout.max_new_tokens ({self.rollout.max_new_tokens})",
                "shorten the buffer or allow longer responses")
        self._check_packing()
        lora = self.model.lora
        require(not (lora.enabled and lora.refit == "adapter" and self.rollout.placement == "disaggregated"),
                "model.lora.refit", lora.refit, "cannot reach engines on their own ranks (the adapter path loads "
                "into the colocated engine's LoRA manager)", "use model.lora.refit=merged with disaggregated engines")
        require(self.model.hf_path != "toy" or self.data.toy is not None, "model.hf_path",
                self.model.hf_path, "is the toy model but data.toy is not set",
                "use the toy_cpu recipe or point model.hf_path at an HF folder")
