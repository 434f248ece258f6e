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
