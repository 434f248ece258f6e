"""Optimizer and LR schedule from `megatron.core.optimizer`: Adam, optionally megatron's distributed
optimizer (ZeRO-1: fp32 master weights and Adam moments sharded over data parallelism, parameters
all-gathered after each step). The DDP wrappers must be built with the same `use_distributed_optimizer`."""

from __future__ import annotations

from typing import Any

from megatron_speed.config.schema import OptimConfig


def build_optimizer(model: Any | list[Any], cfg: OptimConfig, *, total_steps: int, bf16: bool) -> tuple[Any, Any]:
    """Megatron's Adam over the DDP-wrapped model chunk(s), and a warm-up + cosine-to-min_lr schedule.

    `total_steps` is the schedule's length in its own unit (`optim.lr_schedule_unit`); the actor
    advances it once per optimizer update or once per RL step accordingly. With warm-up the LR at
    schedule step k < warm-up is lr * k / warm-up (0 at the first step), as verl's
    `get_constant_schedule_with_warmup`.
    """
    import torch
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = OptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, clip_grad=cfg.clip_grad, bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32, use_distributed_optimizer=cfg.use_distributed_optimizer)
    optimizer = get_megatron_optimizer(config, model if isinstance(model, list) else [model])
    decay_style = "constant" if cfg.min_lr == cfg.lr else "cosine"
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if cfg.lr_warmup_steps else cfg.lr, max_lr=cfg.lr, min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.lr_warmup_steps, lr_decay_steps=max(total_steps, cfg.lr_warmup_steps + 1),
        lr_decay_style=decay_style, start_wd=cfg.weight_decay, end_wd=cfg.weight_decay,
        wd_incr_steps=max(total_steps, 1), wd_incr_style="constant")
    return optimizer, scheduler


def _torch_optimizers(optimizer: Any) -> list[Any]:
    """The torch optimizers inside megatron's (chained) optimizer."""
    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [getattr(o, "optimizer", o) for o in inner]


def adam_moment_bytes(optimizer: Any) -> tuple[int, int]:
    """(bytes of Adam moments allocated now, bytes still to be allocated at the first step).

    torch's Adam creates exp_avg and exp_avg_sq (each like its fp32 main parameter) lazily, so memory
    measured right after the actor is built misses them; the engine's share must leave room for them.
    """
    allocated = pending = 0
    for torch_optimizer in _torch_optimizers(optimizer):
        for group in torch_optimizer.param_groups:
            for param in group["params"]:
                state = torch_optimizer.state.get(param, {})
                moments = [state[k] for k in ("exp_avg", "exp_avg_sq") if k in state]
                if moments:
                    allocated += sum(m.numel() * m.element_size() for m in moments)
                else:
                    pending += 2 * param.numel() * 4
    return allocated, pending


def main_param_bytes(optimizer: Any, model_params: set[int]) -> int:
    """Bytes of the optimizer's own parameter copies (fp32 main params of bf16 training): the params
    it steps that are not the model's (`model_params`: ids of the model's parameters)."""
    return sum(p.numel() * p.element_size() for o in _torch_optimizers(optimizer) for g in o.param_groups
               for p in g["params"] if id(p) not in model_params)
