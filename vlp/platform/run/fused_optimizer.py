"""Whether a run may step AdamW with its fused kernel."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeedStrategy
from torch import Tensor, nn


def fused_optimizer_fits(trainer: Any, module: nn.Module) -> bool:
    """Whether AdamW may run its fused kernel (one pass over all parameters instead of a loop of small ops;
    timings in benchmarks/results/2026-12-02-epyc-2cpu-make-train.md): every parameter a plain tensor on the
    CPU or a CUDA device (not an FSDP2 DTensor), no DeepSpeed (it steps its own flat partitions) and no
    loss scaler (a fused step unscales by itself, so Lightning could not clip the gradients first)."""
    if isinstance(trainer.strategy, LightningDeepSpeedStrategy):
        return False
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        return False
    return all(
        type(p.data) is Tensor and p.device.type in ("cpu", "cuda")
        for p in module.parameters()
        if p.requires_grad
    )
