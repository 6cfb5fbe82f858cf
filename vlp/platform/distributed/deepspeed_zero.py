"""What vlp adds to DeepSpeed ZeRO so its runs equal the other strategies': the parameters ZeRO-3 must
keep gathered for a whole step, gradient partitions cleared after each step, and whether a step applied."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import Strategy
from torch import nn

from vlp.platform.distributed.parallelize import backbones


def read_outside_forward(module: nn.Module) -> list[nn.Parameter]:
    """Parameters that code reads directly instead of through their module's forward, so ZeRO-3 must
    keep them gathered for the whole step: the direct parameters of modules with children (the ViT's
    cls_token / pos_embed, the CLIP temperature, the MLM and caption heads' biases) and the tied word
    embeddings that the MLM and caption vocabulary heads multiply with."""
    found: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        if any(True for _ in sub.children()):
            for param in sub.parameters(recurse=False):
                found.setdefault(id(param), param)
    for backbone in backbones(module):
        weight = backbone.text.word_embeddings.weight
        found.setdefault(id(weight), weight)
    return list(found.values())


def clear_gradient_partitions_after_step(optimizer: Any) -> None:
    """Make a ZeRO optimizer clear its reduced gradient partitions after each step, so a parameter that
    gets no gradient in a step is stepped with a zero gradient, not with the last one it got.

    DeepSpeed (0.19) keeps the reduced gradients in persistent flat buffers that the optimizer steps on
    whole: ZeRO-3 in `grad_partitions_flat_buffer` (and, with an offloaded optimizer, the fp32
    partitions' `.grad`), ZeRO-2 with an offloaded optimizer in the fp32 partitions' `.grad`. It writes
    only the slices of parameters that got a gradient and never clears them. A sampled multi-task step
    leaves the other objectives' heads (and for ITC the fusion layers) unused, so they were stepped with
    the gradient of the last step that used them; a resumed run starts from zero buffers, which is why it
    parted from the uninterrupted run at the second step after resume. The optimizer steps once per
    accumulation window, so clearing after it never drops gradients still being accumulated.

    Private API (deepspeed 0.19.8, tests/test_private_apis.py): the buffers are the ZeRO optimizers' own
    attributes; DeepSpeed offers no public call that zeroes them between steps.
    """
    step = optimizer.step

    def step_and_clear_gradient_partitions(*args: Any, **kwargs: Any) -> Any:
        result = step(*args, **kwargs)
        flat_buffer = getattr(optimizer, "grad_partitions_flat_buffer", None)  # ZeRO-3
        if flat_buffer is not None:
            flat_buffer.zero_()
        fp32_partitions = getattr(optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3
        if fp32_partitions is None:
            fp32_partitions = optimizer.single_partition_of_fp32_groups  # ZeRO-1/2
        for partition in fp32_partitions:
            if partition.grad is not None:
                partition.grad.zero_()
        return result

    optimizer.step = step_and_clear_gradient_partitions


def optimizer_stepped(strategy: Strategy) -> bool:
    """Whether the last `optimizer_step` changed the weights. Lightning calls it once per optimizer step,
    except under DeepSpeed, which accumulates gradients itself: there it runs on every micro-batch and the
    engine steps only at the accumulation boundary (and not after an fp16 overflow)."""
    engine = getattr(strategy, "deepspeed_engine", None)
    return True if engine is None else engine.was_step_applied()
