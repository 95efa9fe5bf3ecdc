"""Megatron optimizer and LR schedule for the actor (Adam, grad clip, cosine with warmup)."""

from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from spark_mcore.trainer.config import TrainerConfig


def build_optimizer(chunks: list[torch.nn.Module], cfg: TrainerConfig, lr: float, total_steps: int,
                    warmup_steps: int, bf16: bool = False,
                    distributed: bool = False) -> tuple[object, OptimizerParamScheduler]:
    """Adam over DDP-wrapped megatron chunks, cosine decay from lr to lr*min_lr_ratio."""
    opt_cfg = OptimizerConfig(
        optimizer="adam", lr=lr, min_lr=lr * cfg.min_lr_ratio, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        clip_grad=cfg.grad_clip, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=distributed,
    )
    # the extra gloo groups are only for the distributed optimizer checkpoint path
    optimizer = get_megatron_optimizer(opt_cfg, chunks, use_gloo_process_groups=False)
    total = max(total_steps, 1)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup_steps > 0 else lr, max_lr=lr, min_lr=lr * cfg.min_lr_ratio,
        lr_warmup_steps=min(warmup_steps, total - 1) if total > 1 else 0, lr_decay_steps=total,
        lr_decay_style="cosine", start_wd=cfg.weight_decay, end_wd=cfg.weight_decay,
        wd_incr_steps=total, wd_incr_style="constant",
    )
    return optimizer, scheduler
