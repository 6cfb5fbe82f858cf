"""Cost monitoring: FLOPs of a training step and the share of image tokens that token merging keeps.

The run machinery's callbacks (docs/design.md) that measure cost rather than steer the run; like the
others it imports nothing from tasks or data modules.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch import Tensor

from vlp.platform.model.backbone import FusionBackbone, first_rows
from vlp.platform.run.callbacks import logs_this_step
from vlp.platform.run.flops import flop_counter


@contextmanager
def _logging_muted(module: LightningModule) -> Iterator[None]:
    """A replayed step must not overwrite the real step's logged values."""
    names = ("log", "log_dict")
    own = {name: module.__dict__[name] for name in names if name in module.__dict__}
    for name in names:
        setattr(module, name, lambda *args, **kwargs: None)
    try:
        yield
    finally:
        for name in names:
            if name in own:
                setattr(module, name, own[name])
            else:
                delattr(module, name)


def training_step_flops(
    module: LightningModule, batch: dict, batch_idx: int = 0, backward: bool = True
) -> int:
    """FLOPs of `module.training_step(batch)` (+ the backward of its loss), leaving no trace behind.

    Gradients go through `torch.autograd.grad`, so `.grad` (and DDP's hooks) stay untouched; the RNG is
    forked, so the training run draws the same numbers with or without the measurement; logging is muted;
    buffers a step changes (a feature queue) are put back.
    """
    device = next(module.parameters()).device
    params = [p for p in module.parameters() if p.requires_grad]
    counter = flop_counter()
    devices = [device.index or 0] if device.type == "cuda" else []
    buffers = {name: buffer.clone() for name, buffer in module.named_buffers()}  # e.g. feature queues
    with torch.random.fork_rng(devices=devices), _logging_muted(module), counter:
        out = module.training_step(batch, batch_idx)
        loss = out["loss"] if isinstance(out, dict) else out
        if backward and isinstance(loss, Tensor) and loss.requires_grad:
            torch.autograd.grad(loss, params, allow_unused=True)
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            buffer.copy_(buffers[name])
    return counter.get_total_flops()


class FlopsMonitor(Callback):
    """Logs `perf/tokens_kept` and `perf/token_blocks_kept` every step and `perf/gflops_per_sample` every
    `every_n_steps` batches.

    tokens_kept: fraction of image tokens at the vision tower's output in the step's last image pass
    (1.0 without merging); token_blocks_kept: the share of the vision blocks' token-blocks that pass ran
    (`FusionBackbone.token_blocks_kept`: ToMe's saving block by block, and that of blocks that unmerge,
    whose output is whole). gflops_per_sample: forward (+ backward) FLOPs of a replay of the step on the
    batch's first `batch_size` samples, divided by them; counted with FlopCounterMode (CPU attention
    included), so it costs about one extra small step. Merging's gather/scatter/sort count as 0 FLOPs.
    In a sampled multi-task run it measures the objective the step serves. Not counted under
    DeepSpeed (the replay cannot run outside its engine).
    """

    def __init__(self, every_n_steps: int = 100, batch_size: int = 2, backward: bool = True) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.every_n_steps, self.batch_size, self.backward = every_n_steps, batch_size, backward
        self._batches = 0

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        backbone = getattr(pl_module, "backbone", None)
        if isinstance(backbone, FusionBackbone) and logs_this_step(trainer):
            pl_module.log("perf/tokens_kept", backbone.tokens_kept, on_step=True, on_epoch=False)
            pl_module.log("perf/token_blocks_kept", backbone.token_blocks_kept, on_step=True, on_epoch=False)
        measure = self._batches % self.every_n_steps == 0
        self._batches += 1
        if not measure or not isinstance(batch, dict):
            return
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            # a replay outside DeepSpeed's engine sees ZeRO-3's partitioned (empty) parameters, and
            # autograd.grad trips ZeRO's gradient hooks: no count under DeepSpeed
            return
        small = first_rows(batch, self.batch_size)
        samples = int(small["image"].shape[0])
        flops = training_step_flops(pl_module, small, batch_idx, self.backward)
        pl_module.log("perf/gflops_per_sample", flops / samples / 1e9, on_step=True, on_epoch=False)
