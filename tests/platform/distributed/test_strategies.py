"""The scaling plan applied to a backbone on one process: activation checkpointing and compile leave the
numbers (and parameter names) as they were; bf16-mixed from the trainer config tracks fp32."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy as LightningDDPStrategy

from vlp.cli import run
from vlp.platform.distributed.parallelize import (
    apply_activation_checkpointing,
    apply_compile,
    transformer_blocks,
)
from vlp.platform.distributed.scalar_parameters import store_scalars_as_vectors
from vlp.platform.distributed.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDP2Strategy,
    allow_unused_parameters,
)
from vlp.platform.model.backbone import FeatureCache
from vlp.platform.model.token_merging import TokenMergingConfig
from vlp.platform.optim import OptimConfig, build_optimizer
from vlp.platform.run.precision import fp16_mixed_on_cpu
from vlp.tasks.itc import ITCObjective
from vlp.tasks.itm import ITMObjective

TINY = Path(__file__).parents[2] / "configs" / "tiny.yaml"
RECORDER = Path(__file__).parents[2] / "distributed"


def _train(backbone, batch: dict, steps: int, with_itm: bool = True) -> list[float]:
    """A few AdamW steps of ITC (+ ITM: the fusion layers) on one batch; the loss before each step."""
    torch.manual_seed(0)
    itc, itm = ITCObjective(backbone), ITMObjective(backbone)
    optimizer = torch.optim.AdamW(itm.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        torch.manual_seed(0)
        features = FeatureCache(backbone, batch)
        loss = itc.forward_loss(batch, features).loss
        if with_itm:
            loss = loss + itm.forward_loss(batch, features).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_blocks_are_every_vit_block_bert_layer_and_fusion_layer(backbone):
    blocks = transformer_blocks(backbone)
    config = (1, 1, 1)  # tiny: one of each
    assert len(blocks) == sum(config)
    assert blocks[0] is backbone.vision.vit.blocks[0] and blocks[-1] is backbone.fusion.layers[0]


def test_activation_checkpointing_keeps_losses_gradients_and_names(make_backbone, batch, one_thread):
    plain, checkpointed = make_backbone(), make_backbone()
    apply_activation_checkpointing(checkpointed)
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    assert _train(checkpointed, batch, 3) == pytest.approx(_train(plain, batch, 3), abs=1e-6)


def test_activation_checkpointing_refuses_token_merging_in_the_vision_tower(make_backbone):
    merging = make_backbone(merging=TokenMergingConfig(vision_r=2))
    with pytest.raises(ValueError, match="token merging"):
        apply_activation_checkpointing(merging)


def test_compiled_blocks_match_eager_within_1e_4(make_backbone, batch, one_thread):
    # ITC only: the vision and text blocks; compiling the fusion layers too triples the test's time
    eager, compiled = make_backbone(), make_backbone()
    apply_compile(compiled)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    losses = _train(compiled, batch, 3, with_itm=False)
    assert losses == pytest.approx(_train(eager, batch, 3, with_itm=False), abs=1e-4)
    assert all(block._compiled_call_impl is not None for block in transformer_blocks(compiled))


def test_scalar_parameters_are_stored_as_vectors_and_still_read_as_scalars(backbone):
    scale = backbone.logit_scale().detach()
    store_scalars_as_vectors(backbone)
    assert backbone.log_logit_scale.shape == ()
    assert backbone.parametrizations.log_logit_scale.original.shape == (1,)
    torch.testing.assert_close(backbone.logit_scale(), scale)


def _fit_losses(tmp_path: Path, precision: str) -> dict[int, float]:
    return _fit(tmp_path, precision)[1]


def _fit(tmp_path: Path, precision: str, *configs: str) -> tuple[Any, dict[int, float]]:
    """3 steps of the tiny config (and `configs`) at `precision`: the CLI and step -> loss."""
    out = tmp_path / precision
    recorder = {"class_path": "recorder.StepRecorder", "init_args": {"out_dir": str(out)}}
    cli = run(
        [
            "fit",
            "--config",
            str(TINY),
            *(arg for config in configs for arg in ("--config", config)),
            f"--trainer.precision={precision}",
            "--trainer.max_steps=3",
            "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={out}",
            f"--trainer.callbacks+={json.dumps(recorder)}",
        ]
    )
    records = [json.loads(line) for line in (out / "rank0.jsonl").read_text().splitlines()]
    return cli, {r["step"]: r["loss"] for r in records if r["event"] == "step"}


def test_bf16_mixed_from_the_trainer_config_tracks_fp32_within_2_percent(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(RECORDER))
    fp32, bf16 = _fit_losses(tmp_path, "32-true"), _fit_losses(tmp_path, "bf16-mixed")
    assert sorted(bf16) == sorted(fp32) == [1, 2, 3]
    for step, loss in fp32.items():
        assert bf16[step] == pytest.approx(loss, rel=0.02), step
    assert bf16 != fp32  # bf16 did run: the losses are not bit-identical


def test_fp16_mixed_on_cpu_trains_with_a_loss_scaler_and_tracks_fp32(tmp_path, monkeypatch, one_thread):
    # Lightning alone would run bf16-mixed instead (with a warning); vlp gives it fp16 autocast + GradScaler
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(RECORDER))
    cli, fp16 = _fit(tmp_path, "16-mixed")
    plugin = cli.trainer.precision_plugin
    assert isinstance(plugin, MixedPrecision) and plugin.precision == "16-mixed" and plugin.device == "cpu"
    assert isinstance(plugin.scaler, torch.amp.GradScaler) and plugin.scaler.is_enabled()
    saved = torch.load(cli.trainer.checkpoint_callback.last_model_path, weights_only=True)
    assert saved["MixedPrecision"]["scale"] == plugin.scaler.get_scale() > 0  # the scaler resumes too
    fp32, bf16 = _fit_losses(tmp_path, "32-true"), _fit_losses(tmp_path, "bf16-mixed")
    assert sorted(fp16) == [1, 2, 3]
    for step, loss in fp32.items():
        assert fp16[step] == pytest.approx(loss, rel=0.05), step
    assert fp16 != fp32 and fp16 != bf16  # fp16 did run, and not as bf16


def test_bf16_true_keeps_bf16_weights_and_tracks_fp32(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(RECORDER))
    cli, bf16 = _fit(tmp_path, "bf16-true")
    assert {p.dtype for p in cli.model.parameters()} == {torch.bfloat16}
    fp32 = _fit_losses(tmp_path, "32-true")
    for step, loss in fp32.items():
        assert bf16[step] == pytest.approx(loss, rel=0.05), step
    assert bf16 != fp32


def test_adamw_is_fused_on_plain_tensors_and_not_under_a_loss_scaler(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(RECORDER))
    plain, _ = _fit(tmp_path, "32-true")
    assert all(group["fused"] for group in plain.trainer.optimizers[0].param_groups)
    scaled, _ = _fit(tmp_path, "16-mixed")  # a fused step would unscale itself, after Lightning's clipping
    assert not any(group["fused"] for group in scaled.trainer.optimizers[0].param_groups)


def test_fused_adamw_steps_like_the_loop_over_parameters(backbone):
    torch.manual_seed(0)
    grads = [torch.randn_like(p) for p in backbone.parameters()]
    weights = {}
    for fused in (False, True):
        model = copy.deepcopy(backbone)
        step = build_optimizer(model, OptimConfig(lr=1e-3), total_steps=10, fused=fused)
        optimizer, scheduler = step["optimizer"], step["lr_scheduler"]["scheduler"]
        for _ in range(3):
            for p, g in zip(model.parameters(), grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
            scheduler.step()
        weights[fused] = [p.detach() for p in model.parameters()]
    for loop, fused in zip(weights[False], weights[True], strict=True):
        torch.testing.assert_close(fused, loop, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("strategy", "message"),
    [
        ("fsdp", r"ModelParallelStrategy` does not support .*precision='16-mixed'"),
        ("deepspeed_zero2", r"trainer.precision: 16-mixed with DeepSpeed needs GPUs"),
    ],
)
def test_fp16_mixed_that_a_strategy_cannot_run_on_cpu_fails_naming_the_precision(
    strategy, message, tmp_path, monkeypatch, one_thread
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(RECORDER))
    config = str(Path(__file__).parents[3] / "configs" / "strategy" / f"{strategy}.yaml")
    with pytest.raises(ValueError, match=message):
        _fit(tmp_path, "16-mixed", config)


def test_fp16_autocast_with_a_scaler_is_chosen_only_for_16_mixed_on_the_cpu_outside_deepspeed_and_fsdp():
    assert fp16_mixed_on_cpu("16-mixed", "cpu", "ddp").device == "cpu"
    assert fp16_mixed_on_cpu("16-mixed", "cpu", DDPStrategy()).precision == "16-mixed"
    on_gpu_machine = torch.cuda.is_available() or torch.backends.mps.is_available()
    assert (fp16_mixed_on_cpu("16-mixed", "auto", "auto") is None) == on_gpu_machine
    assert fp16_mixed_on_cpu("bf16-mixed", "cpu", "ddp") is None
    assert fp16_mixed_on_cpu("16-mixed", "gpu", "ddp") is None
    assert fp16_mixed_on_cpu("16-mixed", "cpu", DeepSpeedStrategy()) is None
    assert fp16_mixed_on_cpu("16-mixed", "cpu", "fsdp") is None


def test_plain_ddp_gets_find_unused_parameters_unless_the_user_set_it():
    plain, explicit = LightningDDPStrategy(), LightningDDPStrategy(find_unused_parameters=False)
    allow_unused_parameters(plain)
    allow_unused_parameters(explicit)
    assert plain._ddp_kwargs["find_unused_parameters"] is True
    assert explicit._ddp_kwargs["find_unused_parameters"] is False
    assert DDPStrategy()._ddp_kwargs["find_unused_parameters"] is True
    assert DDPStrategy(find_unused_parameters=False)._ddp_kwargs["find_unused_parameters"] is False


def test_deepspeed_options_become_its_zero_config():
    zero3 = DeepSpeedStrategy(stage=3, param_persistence_threshold=0, offload_parameters=True).config
    assert zero3["zero_optimization"]["stage"] == 3
    assert zero3["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert zero3["zero_optimization"]["offload_param"] == {"device": "cpu"}
    with pytest.raises(ValueError, match="offload_parameters needs stage: 3"):
        DeepSpeedStrategy(stage=2, offload_parameters=True)


def test_every_strategy_decides_over_ranks_in_one_collective(monkeypatch: pytest.MonkeyPatch):
    """The non-finite guard's per-step decision goes through `decide_over_ranks` (one all-reduce, no
    barrier; its two-rank behaviour is tested in test_distributed) in each of the three strategies."""
    seen: list[tuple[bool, bool]] = []
    monkeypatch.setattr(
        "vlp.platform.distributed.strategies.decide_over_ranks",
        lambda decision, all=True, device="cpu": seen.append((decision, all)) or decision,
    )
    for strategy in (DDPStrategy(), FSDP2Strategy(), DeepSpeedStrategy()):
        monkeypatch.setattr(type(strategy), "root_device", torch.device("cpu"), raising=False)
        assert strategy.reduce_boolean_decision(True, all=False)
    assert seen == [(True, False)] * 3
