"""One AdamW with linear warmup and cosine decay, weight decay off for norms, biases and position tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

NO_DECAY_NAMES = ("pos_embed", "cls_token", "log_logit_scale")


@dataclass
class OptimConfig:
    """`warmup` is a fraction of the total steps when below 1, else a number of steps."""

    lr: float = 5e-4
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.98
    warmup: float = 0.05
    min_lr_ratio: float = 0.05


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters (each shared one once) into decayed matrices and undecayed rest."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():  # named_parameters() already de-duplicates shared ones
        if not param.requires_grad:
            continue
        if param.ndim < 2 or any(key in name for key in NO_DECAY_NAMES):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear 0 -> 1 over warmup, then cosine 1 -> min_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(module: nn.Module, config: OptimConfig, total_steps: int) -> dict:
    """The dict `configure_optimizers` returns; the scheduler steps every optimizer step."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps} (set trainer.max_steps)")
    optimizer = torch.optim.AdamW(
        parameter_groups(module, config.weight_decay), lr=config.lr, betas=(config.beta1, config.beta2)
    )
    warmup_steps = int(config.warmup * total_steps) if config.warmup < 1 else int(config.warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total_steps, max(1, warmup_steps), config.min_lr_ratio)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
