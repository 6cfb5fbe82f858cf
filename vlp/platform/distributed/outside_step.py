"""Running the network outside the strategy's step: TensorBoard pictures, ITM re-ranking at the end of an
evaluation, whole-split scores that call a head.

Lightning runs `training_step`, `validation_step`, ... through the strategy's wrapper; code that calls the
model from a callback or an epoch-end hook does not. Under DeepSpeed ZeRO-3 the engine's forward is what
gathers the parameters that are read directly instead of through their module's forward (the ViT's
position embedding and class token, the temperature, tied vocabulary weights: `read_outside_forward`), so
outside it they are empty partitions. `outside_step` gathers them for the duration; it is a collective,
entered on every rank. FSDP2 gathers the root's parameters itself and DDP holds whole ones: nothing to do.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lightning.pytorch.strategies import DeepSpeedStrategy
from torch import nn

from vlp.platform.distributed.deepspeed_zero import read_outside_forward


@contextmanager
def outside_step(module: nn.Module, strategy: Any) -> Iterator[None]:
    """Make `module` callable outside the strategy's step while the block runs (every rank must enter)."""
    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        from deepspeed.runtime.zero import GatheredParameters

        with GatheredParameters(read_outside_forward(module), modifier_rank=None):
            yield
    else:
        yield
