"""Pure algorithm math: advantage estimators and policy losses (tensors in, tensors out).

Nothing here imports `torch.distributed` or reads the config object; the trainer picks functions
by name from the `ESTIMATORS` and `LOSS_AGGREGATIONS` registries.
"""

from megatron_speed.algorithms.advantages import ESTIMATORS, broadcast_to_tokens, rloo
from megatron_speed.algorithms.losses import LOSS_AGGREGATIONS, ppo_clip_loss, ppo_clip_token_loss, token_mean

__all__ = ["ESTIMATORS", "LOSS_AGGREGATIONS", "broadcast_to_tokens", "ppo_clip_loss", "ppo_clip_token_loss",
           "rloo", "token_mean"]
