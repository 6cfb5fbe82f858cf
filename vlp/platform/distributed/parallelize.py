"""The scaling plan, torchtitan style: one small function per concern, applied to the backbone's blocks.

`apply_activation_checkpointing`, `apply_compile` and `apply_fsdp` each read their own options and touch
only the transformer blocks (`transformer_blocks`) and the root module; the backbone itself knows nothing
of them. Parameter names stay, except the 0-d CLIP temperature, which FSDP2 and DeepSpeed need stored as
[1] (`vlp.platform.distributed.scalar_parameters`). vlp's strategies (`vlp.platform.distributed.strategies`)
choose the options; `parallelize(module, strategy)` is called from the module's `configure_model`.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import Strategy
from torch import nn

from vlp.platform.distributed.scalar_parameters import store_scalars_as_vectors
from vlp.platform.model.backbone import FusionBackbone
from vlp.platform.model.vit_merging import token_merging_state

# LightningModule methods that run the network: FSDP2 gathers the root's parameters around each of them
STEP_METHODS = ("training_step", "validation_step", "test_step", "predict_step")


def backbones(module: nn.Module) -> list[FusionBackbone]:
    """Every distinct FusionBackbone inside `module` (one for a multi-task module: it is shared)."""
    found: dict[int, FusionBackbone] = {}
    for sub in module.modules():
        if isinstance(sub, FusionBackbone):
            found.setdefault(id(sub), sub)
    return list(found.values())


def transformer_blocks(backbone: FusionBackbone) -> list[nn.Module]:
    """The repeated blocks, in forward order: ViT blocks, BERT layers, fusion layers (the caption decoder
    runs through the fusion layers; its own small causal self-attentions stay with the root)."""
    return [*backbone.vision.vit.blocks, *backbone.text.bert.encoder.layer, *backbone.fusion.layers]


def apply_activation_checkpointing(backbone: FusionBackbone) -> None:
    """Recompute each block's activations in backward (non-reentrant; parameter names unchanged)."""
    # Private API (torch 2.14.1, tests/test_private_apis.py): the composable `checkpoint` recomputes a module
    # in place, names kept, and composes with FSDP2's `fully_shard`; the public
    # `torch.utils.checkpoint.checkpoint` would have to be called inside timm's and transformers' forwards
    from torch.distributed._composable import checkpoint

    if token_merging_state(backbone.vision.vit) is not None:
        raise ValueError(
            "activation_checkpointing cannot be combined with token merging in the vision tower "
            "(backbone.merging): recomputation would reread the merged token sizes"
        )
    for block in transformer_blocks(backbone):
        checkpoint(block)


def apply_compile(backbone: FusionBackbone) -> None:
    """`torch.compile` each block in place (`nn.Module.compile`: same object, same parameter names)."""
    for block in transformer_blocks(backbone):
        block.compile()


def apply_block_options(module: nn.Module, activation_checkpointing: bool, compile: bool) -> None:
    """Activation checkpointing, then compile, on the blocks of every backbone in `module`."""
    for backbone in backbones(module):
        if activation_checkpointing:
            apply_activation_checkpointing(backbone)
        if compile:
            apply_compile(backbone)


def apply_fsdp(
    module: LightningModule,
    mesh: Any,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
) -> None:
    """`fully_shard` every block of every backbone, then the root LightningModule.

    The root holds the rest (embeddings, projections, the temperature, the objectives' heads); it is
    gathered around each step method and kept for the whole step, so weights read outside their
    module's forward (the tied word embeddings of the MLM and caption heads) are whole there.
    Blocks that are called through methods besides `forward` declare them (`entry_points`, e.g. the
    fusion layers' `image_key_values`, `self_attention`, `decode_step` of the passes that share work):
    those gather the block too. With token merging in the fusion, which calls each fusion layer's
    `merging_entry_points` (`attend`, then `feed_forward`) in place of `forward`, fusion layers gather
    around them and stay gathered until the step ends.
    """
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        OffloadPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    # pinned host memory speeds up copies to a GPU; CPU ranks have none (and pinning needs one)
    offload = CPUOffloadPolicy(pin_memory=mesh.device_type != "cpu") if cpu_offload else OffloadPolicy()
    store_scalars_as_vectors(module)
    for backbone in backbones(module):
        merges_fusion = backbone.merging is not None and backbone.merging.merges_fusion
        for block in transformer_blocks(backbone):
            merging_fusion_layer = merges_fusion and any(block is layer for layer in backbone.fusion.layers)
            reshard = reshard_after_forward and not merging_fusion_layer
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard, offload_policy=offload)
            entry_points = getattr(block, "entry_points", ())
            if merging_fusion_layer:
                entry_points = (*entry_points, *block.merging_entry_points)
            for name in entry_points:
                register_fsdp_forward_method(block, name)
    fully_shard(module, mesh=mesh, reshard_after_forward=False, offload_policy=offload)
    for name in STEP_METHODS:
        register_fsdp_forward_method(module, name)


def parallelize(module: LightningModule, strategy: Strategy) -> None:
    """Apply `strategy`'s scaling plan to `module` if it has one (vlp's strategies do; Lightning's own
    and single-device ones do not)."""
    plan = getattr(strategy, "parallelize", None)
    if plan is not None:
        plan(module)
