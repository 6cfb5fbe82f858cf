"""The scaling plan applied to a backbone on one process: activation checkpointing and compile leave the
numbers (and parameter names) as they were; bf16-mixed from the trainer config tracks fp32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy as LightningDDPStrategy

from vlp.cli import run
from vlp.platform.model.backbone import FeatureCache
from vlp.platform.model.token_merging import TokenMergingConfig
from vlp.platform.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    allow_unused_parameters,
    apply_activation_checkpointing,
    apply_compile,
    store_scalars_as_vectors,
    transformer_blocks,
)
from vlp.tasks.itc import ITCObjective
from vlp.tasks.itm import ITMObjective

TINY = Path(__file__).parents[1] / "configs" / "tiny.yaml"
RECORDER = Path(__file__).parents[1] / "distributed"


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
    out = tmp_path / precision
    recorder = {"class_path": "recorder.StepRecorder", "init_args": {"out_dir": str(out)}}
    run(
        [
            "fit",
            "--config",
            str(TINY),
            f"--trainer.precision={precision}",
            "--trainer.max_steps=3",
            "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={out}",
            f"--trainer.callbacks+={json.dumps(recorder)}",
        ]
    )
    records = [json.loads(line) for line in (out / "rank0.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["event"] == "step"}


def test_bf16_mixed_from_the_trainer_config_tracks_fp32_within_2_percent(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(RECORDER))
    fp32, bf16 = _fit_losses(tmp_path, "32-true"), _fit_losses(tmp_path, "bf16-mixed")
    assert sorted(bf16) == sorted(fp32) == [1, 2, 3]
    for step, loss in fp32.items():
        assert bf16[step] == pytest.approx(loss, rel=0.02), step
    assert bf16 != fp32  # bf16 did run: the losses are not bit-identical


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
