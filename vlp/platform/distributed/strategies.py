"""Scaling from YAML, torchtitan style: one small function per concern, applied to the backbone's blocks.

`apply_activation_checkpointing`, `apply_compile` and `apply_fsdp` each read their own options and touch
only the transformer blocks (`transformer_blocks`) and the root module; the backbone itself knows nothing
of them. Parameter names stay, except the 0-d CLIP temperature, which FSDP2 and DeepSpeed need stored as
[1] (`store_scalars_as_vectors`); `consolidated_state_dict` (used by `vlp export`) maps it back. Lightning
runs the strategies below; each one's `parallelize(module)` is called from the module's `configure_model`:
- `DDPStrategy`: Lightning's DDP plus checkpointing / compile; `find_unused_parameters` is on unless set
  (a sampled multi-task step or a single objective leaves parts of the shared backbone unused).
- `FSDP2Strategy`: Lightning's `ModelParallelStrategy` (all ranks data-parallel) with `fully_shard` per
  block and on the root LightningModule; also runs on CPU with gloo.
- `DeepSpeedStrategy`: ZeRO-2 / ZeRO-3 from a few options; also runs on CPU ranks.
Precision is Lightning's `trainer.precision` (`bf16-mixed`, `16-mixed`, `bf16-true`, ...).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Literal

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch import LightningModule
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator, MPSAccelerator
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy as LightningDDPStrategy
from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeedStrategy
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from torch import Tensor, nn
from torch.nn.utils import parametrize

from vlp.platform.distributed.collectives import decide_over_ranks
from vlp.platform.model.backbone import FusionBackbone
from vlp.platform.model.token_merging import token_merging_state

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


class ScalarAsVector(nn.Module):
    """Parametrization: a 0-d parameter stored as shape [1] (fully_shard shards only tensors with a dim)."""

    def forward(self, stored: Tensor) -> Tensor:
        return stored.reshape(())

    def right_inverse(self, value: Tensor) -> Tensor:
        return value.reshape(1)


def store_scalars_as_vectors(module: nn.Module) -> None:
    """Store every 0-d parameter (the CLIP temperature) as [1]; reading it still gives a 0-d tensor.

    Its state-dict key becomes `<owner>.parametrizations.<name>.original`; `consolidated_state_dict`
    maps it back, so exported weights load into the plain model.
    """
    for owner in list(module.modules()):
        for name, param in list(owner.named_parameters(recurse=False)):
            if param.ndim == 0:
                parametrize.register_parametrization(owner, name, ScalarAsVector())


class OneCollectiveDecisions:
    """`reduce_boolean_decision` (the non-finite guard's every step, a requeue's) in one all-reduce instead
    of Lightning's barrier and all-reduce (`vlp.platform.distributed.collectives.decide_over_ranks`)."""

    root_device: torch.device

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return decide_over_ranks(decision, all=all, device=self.root_device)


class DDPStrategy(OneCollectiveDecisions, LightningDDPStrategy):
    """Lightning's DDP with activation checkpointing and compile of the blocks.

    `find_unused_parameters` (None: on) lets a step leave parameters without gradients, as a sampled
    multi-task step or a single objective does with parts of the shared backbone.
    """

    def __init__(
        self,
        activation_checkpointing: bool = False,
        compile: bool = False,
        find_unused_parameters: bool | None = None,
        process_group_backend: str | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs["find_unused_parameters"] = True if find_unused_parameters is None else find_unused_parameters
        super().__init__(process_group_backend=process_group_backend, **kwargs)
        self.activation_checkpointing = activation_checkpointing
        self.compile = compile

    def parallelize(self, module: LightningModule) -> None:
        apply_block_options(module, self.activation_checkpointing, self.compile)


class FSDP2Strategy(OneCollectiveDecisions, ModelParallelStrategy):
    """FSDP2 (`fully_shard` per block) over all ranks through Lightning's `ModelParallelStrategy`.

    Checkpoints are sharded folders (torch distributed checkpoint) unless `save_distributed_checkpoint`
    is False; `vlp export` turns either into one weights-only file.
    """

    def __init__(
        self,
        reshard_after_forward: bool = True,
        cpu_offload: bool = False,
        activation_checkpointing: bool = False,
        compile: bool = False,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
        )
        self.reshard_after_forward = reshard_after_forward
        self.cpu_offload = cpu_offload
        self.activation_checkpointing = activation_checkpointing
        self.compile = compile

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every rank shards the model
        super().setup_environment()

    def parallelize(self, module: LightningModule) -> None:
        apply_block_options(module, self.activation_checkpointing, self.compile)
        apply_fsdp(module, self.device_mesh["data_parallel"], self.reshard_after_forward, self.cpu_offload)


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


class DeepSpeedStrategy(OneCollectiveDecisions, LightningDeepSpeedStrategy):
    """DeepSpeed ZeRO-2 / ZeRO-3 from a few options, on GPUs and also on CPU ranks (gloo).

    Lightning's strategy refuses a CPU accelerator; DeepSpeed itself runs ZeRO-2/3 on CPU through its
    CPU accelerator (`DS_ACCELERATOR=cpu`, set here for CPU runs) and gloo, so the check is skipped
    there. `param_persistence_threshold` is ZeRO-3's `stage3_param_persistence_threshold`: parameters
    with fewer elements stay whole on every rank (0: partition everything). Precision comes from
    `trainer.precision` (`bf16-mixed` -> DeepSpeed bf16). Checkpoints are DeepSpeed folders; resume with
    `--ckpt_path FOLDER`, export with `vlp export FOLDER OUT.safetensors`.
    """

    def __init__(
        self,
        stage: Literal[2, 3] = 2,
        offload_optimizer: bool = False,
        offload_parameters: bool = False,
        param_persistence_threshold: int = 100_000,
        activation_checkpointing: bool = False,
        compile: bool = False,
        process_group_backend: str | None = None,
    ) -> None:
        zero: dict[str, Any] = {"stage": stage, "contiguous_gradients": True, "overlap_comm": True}
        if offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        if stage == 3:
            zero["stage3_param_persistence_threshold"] = param_persistence_threshold
            if offload_parameters:
                zero["offload_param"] = {"device": "cpu"}
        elif offload_parameters:
            raise ValueError("offload_parameters needs stage: 3 (ZeRO-2 keeps every parameter on each rank)")
        config = {
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,
            # the optimizer is the module's torch AdamW; offloaded, DeepSpeed would insist on its own
            "zero_force_ds_cpu_optimizer": False,
        }
        super().__init__(config=config, process_group_backend=process_group_backend)
        self.stage = stage
        self.activation_checkpointing = activation_checkpointing
        self.compile = compile

    @property
    def _on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    def setup_environment(self) -> None:
        if self._on_cpu:
            precision = self.precision_plugin.precision
            if precision in ("16-mixed", "16-true"):
                raise ValueError(
                    f"trainer.precision: {precision} with DeepSpeed needs GPUs: DeepSpeed's CPU accelerator "
                    "has no fp16 ('Type fp16 is not supported on your device'); on CPU ranks use "
                    "bf16-mixed or 32-true"
                )
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            LightningDDPStrategy.setup_environment(self)  # skips only the parent's CUDA check
        else:
            super().setup_environment()

    def setup_distributed(self) -> None:
        if not self._on_cpu:
            return super().setup_distributed()
        # the parent's check that CUDA device indices match local ranks has nothing to check on CPU
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def parallelize(self, module: LightningModule) -> None:
        apply_block_options(module, self.activation_checkpointing, self.compile)

    def _setup_model_and_optimizer(self, model: nn.Module, optimizer: Any, lr_scheduler: Any = None) -> Any:
        # DeepSpeed broadcasts parameters viewed as bytes, which a 0-d one cannot be; done here, outside the
        # zero.Init context of configure_model, so the new [1] parameter is converted like every other
        store_scalars_as_vectors(model)
        if self._on_cpu:  # the parent passes the device index, None on CPU; DeepSpeed wants the local rank
            import deepspeed

            engine, optimizer, _, _ = deepspeed.initialize(
                args=argparse.Namespace(device_rank=self.local_rank),
                config=self.config,
                model=model,
                model_parameters=[p for p in model.parameters() if p.requires_grad],
                optimizer=optimizer,
                lr_scheduler=lr_scheduler,
                dist_init_required=False,
            )
        else:
            engine, optimizer = super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        if self.stage == 3:
            from deepspeed.runtime.zero import register_external_parameter

            for param in read_outside_forward(model):
                register_external_parameter(model, param)
        clear_gradient_partitions_after_step(optimizer)
        return engine, optimizer


def optimizer_stepped(strategy: Strategy) -> bool:
    """Whether the last `optimizer_step` changed the weights. Lightning calls it once per optimizer step,
    except under DeepSpeed, which accumulates gradients itself: there it runs on every micro-batch and the
    engine steps only at the accumulation boundary (and not after an fp16 overflow)."""
    engine = getattr(strategy, "deepspeed_engine", None)
    return True if engine is None else engine.was_step_applied()


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


def fused_optimizer_fits(trainer: Any, module: nn.Module) -> bool:
    """Whether AdamW may run its fused kernel (one pass over all parameters instead of a loop of small ops:
    3.6 vs 17 ms a step on the default's 156 tensors, one CPU thread): every parameter a plain tensor on the
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


def parallelize(module: LightningModule, strategy: Strategy) -> None:
    """Apply `strategy`'s scaling plan to `module` if it has one (vlp's strategies do; Lightning's own
    and single-device ones do not)."""
    plan = getattr(strategy, "parallelize", None)
    if plan is not None:
        plan(module)


def allow_unused_parameters(strategy: Strategy) -> None:
    """Turn DDP's `find_unused_parameters` on for Lightning's plain `ddp` / `auto` multi-device strategy
    unless the user set it: without it, the first step that leaves a backbone part unused fails."""
    if isinstance(strategy, LightningDDPStrategy) and not isinstance(strategy, LightningDeepSpeedStrategy):
        strategy._ddp_kwargs.setdefault("find_unused_parameters", True)


def consolidated_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A checkpoint's full `state_dict` as the plain model's: each tensor once, under its plain name.

    Objectives hold the shared backbone, so the module's state dict lists it again under
    `objectives.<name>.backbone.`; those copies are dropped. Scalars that FSDP2 / DeepSpeed stored as [1]
    (`<owner>.parametrizations.<name>.original`) get their own name and shape back. Tensors come back
    contiguous, on the CPU, and never sharing memory (safetensors refuses shared tensors).
    """
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if ".parametrizations." in key and key.endswith(".original"):
            owner, name = key[: -len(".original")].split(".parametrizations.")
            key, value = f"{owner}.{name}", value.reshape(())
        out[key] = value
    shared = set()
    for key in out:
        parts = key.split(".", 2)  # objectives, <name>, backbone.<rest>
        if (
            parts[0] == "objectives"
            and len(parts) == 3
            and parts[2].startswith("backbone.")
            and parts[2] in out
        ):
            shared.add(key)
    return {key: value.detach().cpu().contiguous().clone() for key, value in out.items() if key not in shared}
