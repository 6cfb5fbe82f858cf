from functools import partial

import pytest
import torch
import torch.nn.functional as F
from quiet_trainer import quiet_trainer
from step_only import at_step

from vlp.platform.model.backbone import FeatureCache, FusionBackbone
from vlp.platform.model.encoders import TextConfig, VisionConfig
from vlp.platform.model.fusion import FusionConfig
from vlp.tasks.itc import ITCObjective
from vlp.tasks.merge import MergeObjective, normalised_squared_distance
from vlp.tasks.multitask import MultiTaskModule


@pytest.fixture
def backbone(shapes) -> FusionBackbone:
    torch.manual_seed(0)
    return FusionBackbone(
        vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=2, heads=2),
        text=TextConfig(width=32, depth=1, heads=2, max_len=48),
        fusion=FusionConfig(depth=1, heads=2),
        embed_dim=16,
        tokenizer=shapes.tokenizer,
    )


def loss_at(objective: MergeObjective, batch: dict, step: int):
    return at_step(objective, step).forward_loss(batch, FeatureCache(objective.backbone, batch))


def test_loss_is_exactly_zero_without_merging(backbone, batch):
    out = loss_at(MergeObjective(backbone, r_start=0, r_end=4, ramp_steps=10), batch, step=0)
    assert out.loss.item() == 0.0 and out.logs["r"].item() == 0.0
    out.loss.backward()  # still a graph the trainer can step through
    assert backbone.vision_proj.weight.grad.abs().sum() == 0


def test_loss_is_positive_when_merging(backbone, batch):
    out = loss_at(MergeObjective(backbone, r_start=0, r_end=4, ramp_steps=10, fusion_r=2), batch, step=10)
    assert out.logs["r"].item() == 4.0
    assert out.logs["itc_distance"] > 0 and out.logs["fused_distance"] > 0
    torch.testing.assert_close(out.loss, out.logs["itc_distance"] + out.logs["fused_distance"])


def test_gradients_flow_only_through_the_merged_side(backbone, batch):
    objective = MergeObjective(backbone, r_start=3, r_end=3, ramp_steps=0)
    loss_at(objective, batch, step=0).loss.backward()
    grads = {name: p.grad.clone() for name, p in backbone.named_parameters() if p.grad is not None}
    backbone.zero_grad()
    # Reference: the full forward as a constant target, the merged forward differentiated.
    text = backbone.encode_text(batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        full_image = backbone.encode_image(batch["image"])
        full_fused = backbone.fuse(full_image, text.tokens, text.attention_mask)
    with backbone.merging_override(vision_r=3):
        image = backbone.encode_image(batch["image"])
        fused = backbone.fuse(image, text.tokens, text.attention_mask)
    real = text.attention_mask.bool()
    reference = (2 - 2 * F.cosine_similarity(image.embedding, full_image.embedding)).mean() + (
        2 - 2 * F.cosine_similarity(fused[real], full_fused[real])
    ).mean()
    reference.backward()
    assert grads.keys() == {n for n, p in backbone.named_parameters() if p.grad is not None}
    for name, p in backbone.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)
    assert backbone.merging.vision_r == 0  # the override is undone


def test_schedule_raises_r_linearly_then_holds(backbone):
    objective = MergeObjective(backbone, r_start=2, r_end=10, ramp_steps=100)
    assert [objective.merge_r(s) for s in (0, 25, 50, 100, 500)] == [2, 4, 6, 10, 10]
    assert MergeObjective(backbone, r_start=0, r_end=8, ramp_steps=0).merge_r(0) == 8


def test_bad_arguments_are_rejected(backbone):
    with pytest.raises(ValueError, match="r_end must be >= 0"):
        MergeObjective(backbone, r_end=-1)
    with pytest.raises(ValueError, match="ramp_steps"):
        MergeObjective(backbone, ramp_steps=-5)


def test_a_step_is_required_without_a_trainer(backbone, batch):
    with pytest.raises(ValueError, match="global_step"):
        MergeObjective(backbone).forward_loss(batch, FeatureCache(backbone, batch))


def test_validation_scores_the_final_r(backbone, batch):
    logs = MergeObjective(backbone, r_start=0, r_end=5, ramp_steps=1000).validation_update(
        batch, FeatureCache(backbone, batch)
    )
    assert logs["r"].item() == 5.0 and logs["loss"] > 0


def test_runs_alone_under_a_trainer_with_its_global_step(backbone, shapes):
    objective = MergeObjective(backbone, r_start=0, r_end=4, ramp_steps=2)
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0)
    trainer.fit(objective, train_dataloaders=shapes.dataloader("train"))
    metrics = trainer.callback_metrics
    assert metrics["train/merge/r"].item() == 4.0  # last step: global_step 2 of a 2-step ramp
    assert metrics["train/merge/loss"].item() > 0


def test_runs_in_the_multitask_mix_with_the_runners_step(backbone, batch):
    module = MultiTaskModule(
        backbone, {"itc": ITCObjective, "merge": partial(MergeObjective, r_end=4, ramp_steps=4)}, mode="joint"
    )
    logged = {}
    module.log = lambda key, value, **kwargs: logged.__setitem__(key, value)
    loss = at_step(module, 2).training_step(batch, 0)["loss"]
    assert logged["train/merge/r"].item() == 2.0
    torch.testing.assert_close(loss, logged["train/itc/loss"] + logged["train/merge/loss"])
    loss.backward()
    assert backbone.vision.vit.patch_embed.proj.weight.grad.abs().sum() > 0


def test_the_target_is_the_plain_model_whatever_the_backbone_merges(backbone, batch):
    """A merge the backbone's setting holds beside the objective's r (here the entry merge) is off in the
    full forward the merged one learns from."""
    backbone.set_merging(vision_entry_r=6)
    out = loss_at(MergeObjective(backbone, r_start=0, r_end=0, ramp_steps=0), batch, step=0)
    with torch.no_grad():
        merged = backbone.encode_image(batch["image"]).embedding
        with backbone.merging_override(vision_entry_r=0):
            plain = backbone.encode_image(batch["image"]).embedding
    assert out.logs["itc_distance"] > 0
    torch.testing.assert_close(out.logs["itc_distance"], normalised_squared_distance(merged, plain))
