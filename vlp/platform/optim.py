"""One AdamW with linear warmup and cosine decay, weight decay off for norms, biases and position tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

NO_DECAY_NAMES = ("pos_embed", "cls_token", "log_logit_scale")


@dataclass
class OptimConfig:
    """`warmup` is a fraction of the total steps when below 1, else a number of steps.

    `lr_scales` multiplies the learning rate of parameters by where they sit: a key is a dotted module
    path matched as whole segments anywhere in the parameter name, e.g. `{text: 0.1}` for a pretrained
    text tower (`backbone.text.*`), `{backbone.vision: 0.05}`; the longest matching key wins.
    """

    lr: float = 5e-4
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.98
    warmup: float = 0.05
    min_lr_ratio: float = 0.05
    lr_scales: dict[str, float] = field(default_factory=dict)


def lr_scale(name: str, scales: dict[str, float]) -> float:
    """The multiplier of parameter `name`: the longest key of `scales` found as whole dotted segments."""
    dotted = f".{name}."
    matches = [key for key in scales if f".{key}." in dotted]
    return scales[max(matches, key=len)] if matches else 1.0


def parameter_groups(
    module: nn.Module, weight_decay: float, lr: float, lr_scales: dict[str, float] | None = None
) -> list[dict]:
    """Trainable parameters (each shared one once) in groups of (learning rate, decayed or not).

    Matrices are decayed; norms, biases and position / class tokens are not. Every `lr_scales` key must
    match some parameter, so a typo cannot silently train a tower at the full rate.
    """
    scales = lr_scales or {}
    unused = [key for key in scales if not any(f".{key}." in f".{n}." for n, _ in module.named_parameters())]
    if unused:
        raise ValueError(
            f"optim.lr_scales keys {unused} match no parameter name (e.g. 'text', 'backbone.vision')"
        )
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, param in module.named_parameters():  # named_parameters() already de-duplicates shared ones
        if not param.requires_grad:
            continue
        decayed = param.ndim >= 2 and not any(key in name for key in NO_DECAY_NAMES)
        groups.setdefault((lr_scale(name, scales), decayed), []).append(param)
    return [
        {"params": params, "lr": lr * scale, "weight_decay": weight_decay if decayed else 0.0}
        for (scale, decayed), params in sorted(groups.items(), key=lambda item: (-item[0][0], not item[0][1]))
    ]


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear 0 -> 1 over warmup, then cosine 1 -> min_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(module: nn.Module, config: OptimConfig, total_steps: int, fused: bool = False) -> dict:
    """The dict `configure_optimizers` returns; the scheduler steps every optimizer step. `fused`: torch's
    fused AdamW kernel (the same update in one pass; see `strategies.fused_optimizer_fits`)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps} (set trainer.max_steps)")
    optimizer = torch.optim.AdamW(
        parameter_groups(module, config.weight_decay, config.lr, config.lr_scales),
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        fused=True if fused else None,
    )
    warmup_steps = int(config.warmup * total_steps) if config.warmup < 1 else int(config.warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total_steps, max(1, warmup_steps), config.min_lr_ratio)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
