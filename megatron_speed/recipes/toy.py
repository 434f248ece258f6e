"""The embedded default: the whole loop on a 2-core CPU in a few minutes, and its algorithm variants.

Task and sizes follow the measured facts in the project's toy-task notes: 1-4 digit sums, a 0.8 M
parameter Qwen2 model warm-started on worked answers so pass rates spread between 0 and 1, 8
samples per prompt, 32 prompts per step, lr 1e-4 (1e-3 collapsed the policy).

Variants change only the algorithm and the curriculum, and keep 8 samples per trained prompt and
256 trajectories per optimizer step, so they compare at equal compute per update:
RLOO (n=8) | SPEED-RLOO (screen 4 + continue 4) | JS | SPEED-JS | DAPO | SPEED-DAPO.
DAPO here is the SPEED paper's DAPO: RLOO advantages, clip-higher 0.28, dynamic sampling.

`toy_cpu_moe` is the same loop with a tiny Qwen3-MoE policy (4 experts, top-2, every layer sparse):
megatron MoE layers, the per-expert bridge and refit, router metrics in the logs. Under
`torchrun --nproc-per-node 2` add `parallel.expert_parallel_size=2` for two experts per rank.

`toy_cpu_lora` is `toy_cpu` with LoRA adapters (rank 16, alpha 32) on every attention and MLP
projection instead of full fine-tuning; adapters learn at a 10x higher lr (1e-3), the usual ratio
between LoRA and full-parameter RL learning rates.
"""

from __future__ import annotations

import dataclasses

from megatron_speed.config.schema import (
    AlgorithmConfig,
    Config,
    CurriculumConfig,
    DataConfig,
    EvalConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    RolloutConfig,
    RunConfig,
    ToyTaskConfig,
)


def toy_cpu() -> Config:
    return Config(
        run=RunConfig(name="toy_cpu", output_dir="runs", steps=60, seed=1234),
        data=DataConfig(toy=ToyTaskConfig(max_digits=4, num_operands=2)),
        model=ModelConfig(hf_path="toy"),
        rollout=RolloutConfig(n=8, temperature=1.0, max_new_tokens=12, kv_cache_gib=0.25),
        curriculum=CurriculumConfig(name="none", prompts_per_step=32),
        algorithm=AlgorithmConfig(advantage="rloo", clip_low=0.2, clip_high=0.2),
        optim=OptimConfig(lr=1e-4, min_lr=1e-4, mini_batch_size=256, micro_batch_size=64, clip_grad=1.0),
        eval=EvalConfig(every=10, max_prompts=512),
    )


def _variant(name: str, *, advantage: str = "rloo", curriculum: str = "none", clip_high: float = 0.2) -> Config:
    base = toy_cpu()
    speed = dict(n_init=4, n_continue=4, screen_prompts_per_call=64) if curriculum == "speed" else {}
    return dataclasses.replace(
        base,
        run=dataclasses.replace(base.run, name=name),
        curriculum=dataclasses.replace(base.curriculum, name=curriculum, dapo_prompts_per_call=64, **speed),
        algorithm=dataclasses.replace(base.algorithm, advantage=advantage, clip_high=clip_high),
    )


def toy_cpu_rloo() -> Config:
    return _variant("toy_cpu_rloo")


def toy_cpu_speed_rloo() -> Config:
    return _variant("toy_cpu_speed_rloo", curriculum="speed")


def toy_cpu_js() -> Config:
    return _variant("toy_cpu_js", advantage="js")


def toy_cpu_speed_js() -> Config:
    return _variant("toy_cpu_speed_js", advantage="js", curriculum="speed")


def toy_cpu_dapo() -> Config:
    return _variant("toy_cpu_dapo", curriculum="dapo", clip_high=0.28)


def toy_cpu_speed_dapo() -> Config:
    return _variant("toy_cpu_speed_dapo", curriculum="speed", clip_high=0.28)


def toy_cpu_moe() -> Config:
    base = toy_cpu()
    return dataclasses.replace(base, run=dataclasses.replace(base.run, name="toy_cpu_moe"),
                               model=dataclasses.replace(base.model, toy_family="qwen3_moe"))


def toy_cpu_lora() -> Config:
    base = toy_cpu()
    return dataclasses.replace(
        base,
        run=dataclasses.replace(base.run, name="toy_cpu_lora"),
        model=dataclasses.replace(base.model, lora=LoraConfig(rank=16, alpha=32.0)),
        optim=dataclasses.replace(base.optim, lr=1e-3, min_lr=1e-3),
    )


TOY_RECIPES = {f.__name__: f for f in (toy_cpu, toy_cpu_rloo, toy_cpu_speed_rloo, toy_cpu_js, toy_cpu_speed_js,
                                       toy_cpu_dapo, toy_cpu_speed_dapo, toy_cpu_moe, toy_cpu_lora)}
