"""vlp's Lightning strategies: each adds its scaling plan (`parallelize(module)`, called from the module's
`configure_model`, see `vlp.platform.distributed.parallelize`) to Lightning's.
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
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy as LightningDDPStrategy
from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeedStrategy
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from torch import nn

from vlp.platform.distributed.collectives import decide_over_ranks
from vlp.platform.distributed.deepspeed_zero import clear_gradient_partitions_after_step, read_outside_forward
from vlp.platform.distributed.parallelize import apply_block_options, apply_fsdp
from vlp.platform.distributed.scalar_parameters import store_scalars_as_vectors


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
        # Private API (lightning 2.6.6, tests/test_private_apis.py): ModelParallelStrategy takes "auto" only
        # as all devices of one node; no public setting makes every rank of every node data-parallel
        self._data_parallel_size = self.num_nodes * self.num_processes  # every rank shards the model
        super().setup_environment()

    def parallelize(self, module: LightningModule) -> None:
        apply_block_options(module, self.activation_checkpointing, self.compile)
        apply_fsdp(module, self.device_mesh["data_parallel"], self.reshard_after_forward, self.cpu_offload)


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
        # the parent's check that CUDA device indices match local ranks has nothing to check on CPU. Private
        # API (lightning 2.6.6, tests/test_private_apis.py): `_init_deepspeed_distributed` and
        # `_setup_model_and_optimizer` are the parent's own steps; Lightning offers no public route to
        # DeepSpeed on CPU ranks
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


def allow_unused_parameters(strategy: Strategy) -> None:
    """Turn DDP's `find_unused_parameters` on for Lightning's plain `ddp` / `auto` multi-device strategy
    unless the user set it: without it, the first step that leaves a backbone part unused fails."""
    if isinstance(strategy, LightningDDPStrategy) and not isinstance(strategy, LightningDeepSpeedStrategy):
        # Private API (lightning 2.6.6, tests/test_private_apis.py): the strategy is already built from the
        # user's flags, and its DDP keyword arguments have no public setter
        strategy._ddp_kwargs.setdefault("find_unused_parameters", True)
