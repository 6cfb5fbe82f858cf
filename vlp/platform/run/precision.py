"""The precision plugin a run needs beyond Lightning's own choice."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator, MPSAccelerator
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeedStrategy
from lightning.pytorch.strategies import ModelParallelStrategy


def fp16_mixed_on_cpu(precision: Any, accelerator: Any, strategy: Any) -> MixedPrecision | None:
    """The precision plugin for `16-mixed` on the CPU: fp16 autocast with a loss scaler (GradScaler), which
    torch runs on the CPU; None when the run asks for something else, or its strategy brings its own
    precision handling (DeepSpeed: its fp16, refused on CPU ranks; FSDP2: Lightning refuses 16-mixed).
    Lightning itself turns `16-mixed` on the CPU into `bf16-mixed`, with only a warning."""
    if str(precision) != "16-mixed" or isinstance(
        strategy, (LightningDeepSpeedStrategy, ModelParallelStrategy)
    ):
        return None
    if isinstance(strategy, str) and strategy.startswith(("deepspeed", "fsdp")):
        return None
    if accelerator in (None, "auto"):
        on_cpu = not (CUDAAccelerator.is_available() or MPSAccelerator.is_available())
    else:
        on_cpu = accelerator == "cpu" or isinstance(accelerator, CPUAccelerator)
    return MixedPrecision("16-mixed", "cpu") if on_cpu else None
