"""The embedded default: the whole loop on a 2-core CPU in a few minutes.

Task and sizes follow the measured facts in the project's toy-task notes: 1-4 digit sums, a 0.8 M
parameter Qwen2 model warm-started on worked answers so pass rates spread between 0 and 1, RLOO
with 8 samples per prompt, 32 prompts per step, lr 1e-4 (1e-3 collapsed the policy).
"""

from __future__ import annotations

from megatron_speed.config.schema import (
    AlgorithmConfig,
    Config,
    CurriculumConfig,
    DataConfig,
    EvalConfig,
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
        rollout=RolloutConfig(n=8, temperature=1.0, max_new_tokens=12),
        curriculum=CurriculumConfig(name="none", prompts_per_step=32),
        algorithm=AlgorithmConfig(advantage="rloo", clip_low=0.2, clip_high=0.2),
        optim=OptimConfig(lr=1e-4, min_lr=1e-4, mini_batch_size=256, micro_batch_size=64, clip_grad=1.0),
        eval=EvalConfig(every=10, max_prompts=512),
    )
