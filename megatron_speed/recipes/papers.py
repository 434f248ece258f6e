"""The papers' GPU recipes: SPEED-RL (arXiv 2506.09016) and James-Stein baselines (arXiv 2511.03710).

Grid: {Qwen2.5-Math-1.5B, Qwen2.5-Math-7B} x {NuminaMath, DAPO-17k, DeepScaleR} x {RLOO, DAPO} x SPEED
on/off x JS on/off = 48 recipes, named `<speed_><rloo|dapo><_js>__<model>__<dataset>`, e.g.
`speed_rloo_js__qwen2.5-math-1.5b__dapo17k`. Values come from the SPEED scripts (reference/algorithms.md
§1.5, `run_fast_rloo_7b.sh` / `run_rloo_7b.sh`); JS swaps the RLOO baseline for the James-Stein one and
keeps everything else, as the JSPO paper does (drop-in for RLOO/DAPO).

| setting              | SPEED                         | no SPEED                          |
|----------------------|-------------------------------|-----------------------------------|
| samples per prompt   | n_init 4 + n_continue 20      | rollout.n 24                      |
| prompts per step     | 16 trained, 64 screened/call  | 16 (DAPO: 16 sampled per call)    |
| optimizer            | lr 1e-6, 10 warm-up steps, wd 0.1, grad clip 1.0, one epoch        ||
| PPO clip             | 0.2/0.2 (RLOO), 0.2/0.28 (DAPO), dual-clip c = 10                  ||
| lengths, sampling    | prompt <= 1024, response 3072 tokens, T = 1.0, top_p = 1           ||
| loss                 | token-mean, no KL, no entropy bonus, no overlong shaping           ||
| eval (every 25 steps)| T = 1.0; AIME24/25 mean@16 (7B) or mean@4 (1.5B), AMC23 mean@4,    ||
|                      | MATH500 mean@1, DAPO-17k held-out 1k mean@1 (eval.k_by_set)       ||
| hardware             | 1 node x 4 GPUs (80 GB) for both sizes; 7B uses actor TP=2         ||

"DAPO" is the SPEED paper's DAPO: RLOO advantages + clip-higher 0.28 (+ dynamic sampling without
SPEED; with SPEED the screen already guarantees reward spread). Deliberate difference from the
scripts: the mini-batch counts trajectories (384 = one optimizer step per RL step for every
variant); the SPEED scripts take 6 steps (verl counts 16 prompts x n_init) — reproduce that with
`optim.mini_batch_size=64`. Evaluation samples each set as the scripts do (`eval.k_by_set`): AIME24/25
mean@16 on 7B and mean@4 on 1.5B, AMC23 mean@4, MATH500 and the DAPO-1k held-out mean@1. Memory
settings (distributed optimizer, 16k-token micro-batches) are starting points, not tuned on GPUs.
The prompt limit of 1024 tokens is implied by the models' 4096-token context (1024 + 3072). The
paper does not state a run length; `run.steps=500` is a budget to override. Expected time to the
paper's accuracy targets on 4 GPUs: 2-26 h (§1.6).

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
EVAL_K = 4  # samples per evaluation prompt (AMC23's), overridden per set below
AIME_K = {"qwen2.5-math-1.5b": 4, "qwen2.5-math-7b": 16}  # mean@16 on 7B, mean@4 on 1.5B


def eval_k_by_set(model_key: str) -> tuple[str, ...]:
    aime = AIME_K[model_key]
    return (f"aime24={aime}", f"aime25={aime}", "math500=1", "dapo17k_heldout=1")


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
    return Config(
        run=RunConfig(name=name, output_dir="runs", steps=500, seed=1234, save_hf_every=100),
        data=DataConfig(train_files=(data_file(DATASETS[dataset]),)),
        model=ModelConfig(hf_path=model_dir(model.hf_name), params_dtype="bfloat16"),
        parallel=ParallelConfig(tensor_parallel_size=model.tensor_parallel_size),
        rollout=RolloutConfig(n=24, temperature=1.0, top_p=1.0, max_new_tokens=3072, tensor_parallel_size=1,
                              gpu_memory_utilization=0.6, enforce_eager=False),
        curriculum=CurriculumConfig(name=curriculum, prompts_per_step=16, n_init=4, n_continue=20,
                                    screen_prompts_per_call=64, dapo_prompts_per_call=16, max_calls_per_step=50),
        rewards=RewardConfig(grader="math_verify", num_workers=8, timeout_seconds=5.0),
        algorithm=AlgorithmConfig(advantage="js" if js else "rloo", clip_low=0.2,
                                  clip_high=0.28 if base == "dapo" else 0.2, clip_c=10.0,
                                  loss_aggregation="token-mean", kl_coef=0.0, entropy_coef=0.0),
        optim=OptimConfig(lr=1e-6, min_lr=1e-6, lr_warmup_steps=10, weight_decay=0.1, clip_grad=1.0,
                          mini_batch_size=384, micro_batch_size=8, micro_batch_tokens=16384,
                          use_distributed_optimizer=True),
        eval=EvalConfig(every=25, max_prompts=1000, files=EVAL_SETS, data_dir=data_dir(), k=EVAL_K,
                        k_by_set=eval_k_by_set(model_key), temperature=1.0,
                        top_p=1.0),
    )


def jspo_qwen3_4b_dapo17k() -> Config:
    """JSPO's math run (`code/run_math.sh`): Qwen3-4B-Base on DAPO-17k, n=4, 1024 prompts per step,
    mini-batch 128 prompts (512 trajectories), lr 1e-6, response 6144, clip 0.2/0.28, token-mean, no
    KL; eval AIME24/25 at T=0.6, top_p 0.95, n=16. The paper trained on 8 GPUs (not stated: assume 1
    node x 8 x 80 GB)."""
    base = speed_paper("qwen2.5-math-7b", "dapo17k", base="dapo", speed=False, js=True)
    return dataclasses.replace(
        base,
        run=dataclasses.replace(base.run, name="jspo__qwen3-4b-base__dapo17k", steps=200),

        model=dataclasses.replace(base.model, hf_path=model_dir("Qwen3-4B-Base")),
        rollout=dataclasses.replace(base.rollout, n=4, max_new_tokens=6144),
        curriculum=dataclasses.replace(base.curriculum, name="none", prompts_per_step=1024),
        algorithm=dataclasses.replace(base.algorithm, clip_c=None),
        optim=dataclasses.replace(base.optim, lr_warmup_steps=0, weight_decay=0.0, mini_batch_size=512),
        eval=dataclasses.replace(base.eval, files=("aime24", "aime25"), k=16, temperature=0.6, top_p=0.95),
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
