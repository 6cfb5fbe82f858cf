"""Every private API vlp relies on, checked against the installed libraries.

Each row names the API, where vlp uses it and the version it was checked against; the check fails with
that line when an upgrade removes or renames it, instead of a run that silently computes something else.
The code at each use says why no public route serves.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import torch


class PrivateAPI(NamedTuple):
    name: str  # the API as code writes it
    package: str  # the distribution that provides it
    checked: str  # the version it was checked against
    used_in: str  # where vlp uses it
    present: Callable[[], bool]  # whether the installed package still has it


def _source(package: str, relative: str) -> str:
    """A module's source text, read without importing it (DeepSpeed's import is slow)."""
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations, f"{package} is not installed"
    return (Path(next(iter(spec.submodule_search_locations))) / relative).read_text()


def _trainer():
    from lightning.pytorch import Trainer

    return Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)


def _has_attributes(obj: object, names: str) -> bool:
    return all(hasattr(obj, name) for name in names.split())


def _timm_block_reads() -> bool:
    from timm.models.vision_transformer import Attention, Block

    block = Block(dim=8, num_heads=2)
    return (
        type(block.attn) is Attention
        and _has_attributes(block, "attn norm1 norm2 ls1 ls2 drop_path1 drop_path2 mlp")
        and _has_attributes(
            block.attn, "qkv num_heads head_dim scale q_norm k_norm attn_drop proj proj_drop fused_attn"
        )
    )


def _bert_layer_reads() -> bool:
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer, BertSelfAttention

    layer = BertLayer(BertConfig(hidden_size=8, num_attention_heads=2, intermediate_size=16))
    attention = layer.attention.self
    parameters = list(inspect.signature(BertLayer.forward).parameters)
    return (
        type(attention) is BertSelfAttention
        and _has_attributes(attention, "query key value attention_head_size dropout scaling")
        and _has_attributes(layer, "attention intermediate output")
        and hasattr(layer.attention, "output")
        and parameters[:3] == ["self", "hidden_states", "attention_mask"]
    )


def _attn_implementation_settable() -> bool:
    from transformers import BertConfig

    config = BertConfig()
    config._attn_implementation = "sdpa"
    return config._attn_implementation == "sdpa"


def _lr_scheduler_last_lr() -> bool:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    return hasattr(torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), "_last_lr")


def _lightning_fit_loop() -> bool:
    fit_loop = _trainer().fit_loop
    check_val = getattr(fit_loop.epoch_loop, "_should_check_val_fx", None)
    return (
        callable(getattr(fit_loop, "_should_accumulate", None))
        and hasattr(fit_loop, "_data_fetcher")
        and check_val is not None
        and list(inspect.signature(check_val).parameters) == ["data_fetcher"]
    )


def _cli_instantiate_trainer() -> bool:
    from lightning.pytorch.cli import LightningCLI

    method = getattr(LightningCLI, "_instantiate_trainer", None)
    return method is not None and list(inspect.signature(method).parameters) == [
        "self",
        "config",
        "callbacks",
    ]


def _deepspeed_strategy_hooks() -> bool:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    setup = getattr(DeepSpeedStrategy, "_setup_model_and_optimizer", None)
    return (
        callable(getattr(DeepSpeedStrategy, "_init_deepspeed_distributed", None))
        and setup is not None
        and list(inspect.signature(setup).parameters)[:4] == ["self", "model", "optimizer", "lr_scheduler"]
    )


def _model_parallel_size() -> bool:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return hasattr(
        ModelParallelStrategy(data_parallel_size="auto", tensor_parallel_size=1), "_data_parallel_size"
    )


def _ddp_kwargs() -> bool:
    from lightning.pytorch.strategies import DDPStrategy

    return isinstance(getattr(DDPStrategy(), "_ddp_kwargs", None), dict)


def _composable_checkpoint() -> bool:
    from torch.distributed._composable import checkpoint

    return callable(checkpoint)


def _pytree() -> bool:
    from torch.utils import _pytree

    return callable(getattr(_pytree, "tree_flatten", None)) and callable(
        getattr(_pytree, "tree_unflatten", None)
    )


def _cpu_flash_attention_ops() -> bool:
    aten = torch.ops.aten
    return hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu") and hasattr(
        aten, "_scaled_dot_product_flash_attention_for_cpu_backward"
    )


APIS = [
    PrivateAPI(
        "Trainer._accelerator_connector.cluster_environment",
        "lightning",
        "2.6.6",
        "vlp/platform/run/requeue.py",
        lambda: hasattr(_trainer()._accelerator_connector, "cluster_environment"),
    ),
    PrivateAPI(
        "fit_loop._should_accumulate, epoch_loop._should_check_val_fx(fit_loop._data_fetcher)",
        "lightning",
        "2.6.6",
        "vlp/platform/run/requeue.py",
        _lightning_fit_loop,
    ),
    PrivateAPI(
        "Trainer._logger_connector.should_update_logs",
        "lightning",
        "2.6.6",
        "vlp/platform/run/callbacks.py (logs_this_step)",
        lambda: hasattr(type(_trainer()._logger_connector), "should_update_logs"),
    ),
    PrivateAPI(
        "LightningCLI._instantiate_trainer(config, callbacks)",
        "lightning",
        "2.6.6",
        "vlp/cli/lightning_cli.py",
        _cli_instantiate_trainer,
    ),
    PrivateAPI(
        "DeepSpeedStrategy._init_deepspeed_distributed, _setup_model_and_optimizer",
        "lightning",
        "2.6.6",
        "vlp/platform/distributed/strategies.py (DeepSpeedStrategy)",
        _deepspeed_strategy_hooks,
    ),
    PrivateAPI(
        "ModelParallelStrategy._data_parallel_size",
        "lightning",
        "2.6.6",
        "vlp/platform/distributed/strategies.py (FSDP2Strategy)",
        _model_parallel_size,
    ),
    PrivateAPI(
        "DDPStrategy._ddp_kwargs",
        "lightning",
        "2.6.6",
        "vlp/platform/distributed/strategies.py (allow_unused_parameters)",
        _ddp_kwargs,
    ),
    PrivateAPI(
        "torch.distributed._composable.checkpoint",
        "torch",
        "2.14.1",
        "vlp/platform/distributed/parallelize.py (apply_activation_checkpointing)",
        _composable_checkpoint,
    ),
    PrivateAPI(
        "torch.utils._pytree.tree_flatten / tree_unflatten",
        "torch",
        "2.14.1",
        "vlp/platform/model/length_buckets.py",
        _pytree,
    ),
    PrivateAPI(
        "torch._foreach_copy_, torch._foreach_lerp_",
        "torch",
        "2.14.1",
        "vlp/platform/model/momentum.py",
        lambda: (
            callable(getattr(torch, "_foreach_copy_", None))
            and callable(getattr(torch, "_foreach_lerp_", None))
        ),
    ),
    PrivateAPI(
        "aten._scaled_dot_product_flash_attention_for_cpu (+ _backward)",
        "torch",
        "2.14.1",
        "vlp/platform/run/flops.py",
        _cpu_flash_attention_ops,
    ),
    PrivateAPI(
        "LRScheduler._last_lr",
        "torch",
        "2.14.1",
        "vlp/platform/run/callbacks.py (ResumeWithConfiguredOptimizer)",
        _lr_scheduler_last_lr,
    ),
    PrivateAPI(
        "PretrainedConfig._attn_implementation",
        "transformers",
        "5.23.0",
        "vlp/platform/model/encoders.py",
        _attn_implementation_settable,
    ),
    PrivateAPI(
        "BertLayer -> PackedBertLayer class swap (BertLayer / BertSelfAttention attributes)",
        "transformers",
        "5.23.0",
        "vlp/platform/model/encoders.py (switch_to_packed_layers)",
        _bert_layer_reads,
    ),
    PrivateAPI(
        "Block / Attention -> MergingBlock / MergingAttention class swap (their attributes)",
        "timm",
        "1.0.31",
        "vlp/platform/model/vit_merging.py (apply_token_merging)",
        _timm_block_reads,
    ),
    PrivateAPI(
        "ZeRO-3 grad_partitions_flat_buffer, fp32_partitioned_groups_flat; ZeRO-1/2 single_partition_of_fp32_groups",
        "deepspeed",
        "0.19.8",
        "vlp/platform/distributed/deepspeed_zero.py (clear_gradient_partitions_after_step)",
        lambda: (
            "self.grad_partitions_flat_buffer" in _source("deepspeed", "runtime/zero/stage3.py")
            and "self.fp32_partitioned_groups_flat" in _source("deepspeed", "runtime/zero/stage3.py")
            and "self.single_partition_of_fp32_groups"
            in _source("deepspeed", "runtime/zero/stage_1_and_2.py")
        ),
    ),
]


def check(api: PrivateAPI) -> None:
    """Fails naming the API, where vlp uses it, the version checked and the version installed."""
    installed = importlib.metadata.version(api.package)
    try:
        present = api.present()
    except (AttributeError, ImportError, TypeError) as error:
        present, why = False, f" ({type(error).__name__}: {error})"
    else:
        why = ""
    assert present, (
        f"{api.name}: {api.used_in} relies on this private {api.package} API, checked against {api.package} "
        f"{api.checked}; the installed {api.package} {installed} no longer provides it{why}. Port that code "
        "to what the new version offers (or pin the checked version) before trusting a run."
    )


@pytest.mark.parametrize("api", APIS, ids=[api.name.split(" ")[0] for api in APIS])
def test_private_api_is_still_there(api: PrivateAPI):
    check(api)


def test_a_removed_api_fails_naming_it_its_use_and_both_versions():
    def removed() -> bool:
        raise AttributeError("'_FitLoop' object has no attribute '_should_accumulate'")

    gone = PrivateAPI(
        "fit_loop._should_accumulate", "lightning", "2.6.6", "vlp/platform/run/requeue.py", removed
    )
    installed = importlib.metadata.version("lightning")
    expected = rf"fit_loop._should_accumulate: vlp/platform/run/requeue.py .* lightning 2.6.6; the installed lightning {installed} no longer provides it \(AttributeError"
    with pytest.raises(AssertionError, match=expected):
        check(gone)
