"""Pure algorithm math: advantage estimators, policy losses and reward shaping (tensors in, tensors out).

Nothing here imports `torch.distributed` or reads the config object; the trainer picks functions
by name from the `ESTIMATORS` and `LOSS_AGGREGATIONS` registries.
"""

from megatron_speed.algorithms.advantages import ESTIMATORS, broadcast_to_tokens, drgrpo, grpo, rloo
from megatron_speed.algorithms.aggregation import LOSS_AGGREGATIONS, aggregate_loss
from megatron_speed.algorithms.js import js, js_shrinkage
from megatron_speed.algorithms.losses import kl_penalty, policy_objective, ppo_clip_loss, ppo_clip_token_loss
from megatron_speed.algorithms.shaping import overlong_penalty

__all__ = ["ESTIMATORS", "LOSS_AGGREGATIONS", "aggregate_loss", "broadcast_to_tokens", "drgrpo", "grpo", "js",
           "js_shrinkage", "kl_penalty", "overlong_penalty", "policy_objective", "ppo_clip_loss",
           "ppo_clip_token_loss", "rloo"]
