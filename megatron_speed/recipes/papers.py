"""The papers' GPU recipes: SPEED-RL (arXiv 2506.09016) and James-Stein baselines (arXiv 2511.03710).

Grid: {Qwen2.5-Math-1.5B, Qwen2.5-Math-7B} x {NuminaMath, DAPO-17k, DeepScaleR} x {RLOO, DAPO} x SPEED
on/off x JS on/off = 48 recipes, named `<speed_><rloo|dapo><_js>__<model>__<dataset>`, e.g.
`speed_rloo_js__qwen2.5-math-1.5b__dapo17k`. Values come from the SPEED scripts (reference/algorithms.md
§1.5, `run_fast_rloo_7b.sh` / `run_rloo_7b.sh`) and reproduce upstream's behaviour, including where it
is surprising; JS swaps the RLOO baseline for the James-Stein one and keeps everything else, as the
JSPO paper does (drop-in for RLOO/DAPO).

| setting              | SPEED                         | no SPEED                          |
|----------------------|-------------------------------|-----------------------------------|
| samples per prompt   | n_init 4 + n_continue 20      | rollout.n 24                      |
| prompts per step     | 16 trained, 64 screened/call  | 16 (DAPO: 16 sampled per call)    |
| optimizer updates    | 6 per RL step (mini-batch 64) | 1 per RL step (mini-batch 384)    |
| DAPO surplus groups  | (no DAPO filter with SPEED)   | discarded, as verl's DAPO trainer |
| optimizer            | lr 1e-6, 10 warm-up RL steps (schedule counted in RL steps), wd 0.1, grad clip 1.0 ||
| PPO clip             | 0.2/0.2 (RLOO), 0.2/0.28 (DAPO), dual-clip c = 10                  ||
| lengths, sampling    | prompt <= 1024, response 3072 tokens, T = 1.0, top_p = 1           ||
| loss                 | token-mean, no KL, no entropy bonus, no overlong shaping           ||
| reward               | math-verify `math_metric` on the whole response (`math_verify_response`) ||
| eval (every 25 steps)| sampled only, T = 1.0: AIME24/25 mean@16, AMC23 (83 problems) mean@4,    ||
|                      | MATH500 and DAPO-17k held-out 1k mean@1; 1.5B NuminaMath RLOO cells: ||
|                      | AIME mean@4, AMC mean@1 (the k of the papers' own metrics files)   ||
| time-to-target       | 7B: DAPO-1k 0.45, MATH500 0.80, AMC23 0.55, AIME mean(24, 25) 0.18; ||
|                      | 1.5B: 0.30 / 0.70 / 0.40 / 0.10 (the paper's main table, §1.6)     ||
| memory               | full activation recompute (upstream: `enable_gradient_checkpointing`) ||
| hardware             | 1 node x 4 GPUs (80 GB) for both sizes; 7B uses actor TP=2         ||

Updates per RL step: upstream counts `ppo_mini_batch_size` (16) in prompts and multiplies it by
`rollout.n`, which for SPEED is n_init = 4, so a SPEED step of 16 x 24 = 384 trajectories makes 6
optimizer updates and the N = 24 baseline 1. The recipes reproduce that. The CONTROLLED comparison,
equal updates for every arm, is one override away: `optim.mini_batch_size=384`.

"DAPO" is the SPEED paper's DAPO: RLOO advantages + clip-higher 0.28 (+ dynamic sampling without
SPEED; with SPEED the screen already guarantees reward spread). Our buffered DAPO surplus
(`curriculum.dapo_surplus=keep`) is the named improvement, off in these recipes. Activations are
recomputed layer by layer (`model.recompute=full`) as upstream's scripts do (speed-rl's `run_*.sh`
and JSPO's `run_math.sh` set verl's `enable_gradient_checkpointing=True`); without it
`tools/memory_plan.py` puts the train phase at 80-101 GiB per 80 GB GPU. The other memory settings
(distributed optimizer, 16k-token micro-batches) are starting points, not tuned on GPUs. The prompt
limit of 1024 tokens is implied by the models' 4096-token context (1024 + 3072). The paper does not
state a run length; `run.steps=500` is a budget to override. Expected time to the paper's accuracy
targets on 4 GPUs: 2-26 h (§1.6). The RL clock excludes evaluation, checkpoints and HF exports, as
upstream's does.

Paths are read when a recipe is built, from the environment so that the same recipe name resolves
on the submitting host and in the job (`launch.py` forwards both variables):
`MEGATRON_SPEED_DATA_DIR` (default `data`) holds `<name>.parquet` from `examples/data_preprocess`;
`MEGATRON_SPEED_MODEL_DIR` (default `models`) holds HF folders named like the hub repos
(`Qwen2.5-Math-7B`). One `jspo__qwen3-4b-base__dapo17k` recipe follows the JSPO paper's own
math setup (§2.5, `code/run_math.sh`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from collections.abc import Callable
from pathlib import Path

from megatron_speed.config.schema import (
    AlgorithmConfig,
    Config,
    CurriculumConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RewardConfig,
    RolloutConfig,
    RunConfig,
)

DATA_DIR_ENV = "MEGATRON_SPEED_DATA_DIR"
MODEL_DIR_ENV = "MEGATRON_SPEED_MODEL_DIR"


@dataclasses.dataclass(frozen=True)
class PaperModel:
    hf_name: str  # folder name under MEGATRON_SPEED_MODEL_DIR (the hub repo's name)
    tensor_parallel_size: int


MODELS = {
    "qwen2.5-math-1.5b": PaperModel("Qwen2.5-Math-1.5B", tensor_parallel_size=1),
    "qwen2.5-math-7b": PaperModel("Qwen2.5-Math-7B", tensor_parallel_size=2),
}
# Training sets; DAPO-17k trains on the 16k left after the 1k held-out split.
DATASETS = {"numinamath": "numinamath", "dapo17k": "dapo17k", "deepscaler": "deepscaler"}
EVAL_SETS = ("aime24", "aime25", "amc23", "math500", "dapo17k_heldout")  # prepared names under the data dir
UPSTREAM_GRADER = "math_verify_response"  # both papers: math_metric over the whole response


def eval_k_by_set(model_key: str, dataset: str, base: str) -> tuple[str, ...]:
    """Samples per held-out prompt, per set, as in the papers' metrics files (`metrics_summary/` at
    speed-rl 3a440be): AIME x16 and AMC x4, except the 1.5B NuminaMath RLOO cells (AIME x4, AMC x1).
    The 1.5B DeepScaleR cells, not in the paper, take the common x16 / x4."""
    aime, amc = (4, 1) if (model_key, dataset, base) == ("qwen2.5-math-1.5b", "numinamath", "rloo") else (16, 4)
    return (f"aime24={aime}", f"aime25={aime}", f"amc23={amc}", "math500=1", "dapo17k_heldout=1")


def paper_targets(model_key: str) -> tuple[str, ...]:
    """The SPEED paper's accuracy targets for its time-to-target table (reference/algorithms.md §1.6),
    on each set's avg@k curve; AIME is the mean of AIME24 and AIME25."""
    dapo, math500, amc, aime = (0.45, 0.80, 0.55, 0.18) if model_key == "qwen2.5-math-7b" else (0.30, 0.70, 0.40, 0.10)
    return (f"dapo17k_heldout={dapo}", f"math500={math500}", f"amc23={amc}", f"aime24+aime25={aime}")


def upstream_mini_batch(prompts_per_step: int, samples_per_call_prompt: int) -> int:
    """verl's mini-batch in trajectories: `ppo_mini_batch_size` prompts x `rollout.n` (SPEED: n_init)."""
    return prompts_per_step * samples_per_call_prompt


def data_dir() -> str:
    return os.environ.get(DATA_DIR_ENV, "data")


def data_file(name: str) -> str:
    return str(Path(data_dir()) / f"{name}.parquet")


def model_dir(hf_name: str) -> str:
    return str(Path(os.environ.get(MODEL_DIR_ENV, "models")) / hf_name)


def speed_paper(model_key: str, dataset: str, *, base: str, speed: bool, js: bool) -> Config:
    """One cell of the grid; `base` is "rloo" or "dapo" (the SPEED paper's DAPO)."""
    model = MODELS[model_key]
    name = f"{'speed_' if speed else ''}{base}{'_js' if js else ''}__{model_key}__{dataset}"
    curriculum = "speed" if speed else ("dapo" if base == "dapo" else "none")
    prompts, n_init, n = 16, 4, 24
    return Config(
        run=RunConfig(name=name, output_dir="runs", steps=500, seed=1234, save_hf_every=100),
        data=DataConfig(train_files=(data_file(DATASETS[dataset]),)),
        model=ModelConfig(hf_path=model_dir(model.hf_name), params_dtype="bfloat16", recompute="full"),
        parallel=ParallelConfig(tensor_parallel_size=model.tensor_parallel_size),
        rollout=RolloutConfig(n=n, temperature=1.0, top_p=1.0, max_new_tokens=3072, tensor_parallel_size=1,
                              gpu_memory_utilization=0.6, enforce_eager=False),
        curriculum=CurriculumConfig(name=curriculum, prompts_per_step=prompts, n_init=n_init, n_continue=n - n_init,
                                    screen_prompts_per_call=64, dapo_prompts_per_call=16, dapo_surplus="discard",
                                    max_calls_per_step=50),
        # math-verify's own limits can add up to ~32 s on one item (5 s per parse, 5 s per comparison,
        # up to 4 comparisons); upstream waits them out and scores 0, so our hard cut does too.
        rewards=RewardConfig(grader=UPSTREAM_GRADER, num_workers=8, timeout_seconds=35.0),
        algorithm=AlgorithmConfig(advantage="js" if js else "rloo", clip_low=0.2,
                                  clip_high=0.28 if base == "dapo" else 0.2, clip_c=10.0,
                                  loss_aggregation="token-mean", kl_coef=0.0, entropy_coef=0.0),
        optim=OptimConfig(lr=1e-6, min_lr=1e-6, lr_warmup_steps=10, lr_schedule_unit="rl_step", weight_decay=0.1,
                          clip_grad=1.0, mini_batch_size=upstream_mini_batch(prompts, n_init if speed else n),
                          micro_batch_size=8, micro_batch_tokens=16384, use_distributed_optimizer=True),
        eval=EvalConfig(every=25, max_prompts=1000, files=EVAL_SETS, data_dir=data_dir(), k=4,
                        k_by_set=eval_k_by_set(model_key, dataset, base), temperature=1.0, top_p=1.0,
                        greedy=False, targets=paper_targets(model_key)),
    )


def jspo_qwen3_4b_dapo17k() -> Config:
    """JSPO's math run (`code/run_math.sh`): Qwen3-4B-Base on DAPO-17k, n=4, 1024 prompts per step,
    mini-batch 128 prompts (512 trajectories: 8 updates per RL step), lr 1e-6 constant, response 6144,
    clip 0.2/0.28 with verl's default dual-clip 3.0 and weight decay 0.01, token-mean, no KL, the
    `qwen-math` chat template (system turn "Please reason step by step and put the final answer in
    \\boxed{}."); eval every 10 steps, AIME24/25 at T=0.6, top_p 0.95, n=16. Hardware: the script asks
    for 1 node x 4 H100 (80 GB). Difference kept: we train on DAPO-17k minus our 1k held-out split.
    No `eval.targets`: the JSPO paper reports accuracies, not times to a target."""
    base = speed_paper("qwen2.5-math-7b", "dapo17k", base="dapo", speed=False, js=True)
    return dataclasses.replace(
        base,
        run=dataclasses.replace(base.run, name="jspo__qwen3-4b-base__dapo17k", steps=200),
        data=dataclasses.replace(base.data, prompt_template="qwen-math"),
        model=dataclasses.replace(base.model, hf_path=model_dir("Qwen3-4B-Base")),
        rollout=dataclasses.replace(base.rollout, n=4, max_new_tokens=6144),
        curriculum=dataclasses.replace(base.curriculum, name="none", prompts_per_step=1024),
        algorithm=dataclasses.replace(base.algorithm, clip_c=3.0),
        optim=dataclasses.replace(base.optim, lr_warmup_steps=0, weight_decay=0.01,
                                  mini_batch_size=upstream_mini_batch(128, 4)),
        eval=dataclasses.replace(base.eval, every=10, files=("aime24", "aime25"), k=16, k_by_set=(),
                                 temperature=0.6, top_p=0.95, targets=()),
    )


def _grid() -> dict[str, Callable[[], Config]]:
    recipes: dict[str, Callable[[], Config]] = {}
    for model_key, dataset, base, speed, js in itertools.product(MODELS, DATASETS, ("rloo", "dapo"),
                                                                 (False, True), (False, True)):
        name = f"{'speed_' if speed else ''}{base}{'_js' if js else ''}__{model_key}__{dataset}"
        recipes[name] = functools.partial(speed_paper, model_key, dataset, base=base, speed=speed, js=js)
    recipes["jspo__qwen3-4b-base__dapo17k"] = jspo_qwen3_4b_dapo17k
    return recipes


PAPER_RECIPES = _grid()
