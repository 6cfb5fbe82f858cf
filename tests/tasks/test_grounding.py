"""Grounding: L1 + GIoU loss by hand, safe gradients, valid head boxes, Acc@0.5 / mIoU, pictures, and a
short run on shapes that grounds phrases far above chance."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

from vlp.datamodules.multitask import MultiTaskDataModule
from vlp.datamodules.shapes import ShapesSource
from vlp.platform.metrics import grounding_scores
from vlp.platform.model.backbone import FeatureCache
from vlp.platform.model.token_merging import TokenMergingConfig
from vlp.platform.optim import OptimConfig
from vlp.tasks.grounding import BoxHead, GroundingObjective, box_loss


def test_box_loss_equals_hand_computation_on_two_boxes():
    pred = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.2, 0.2, 0.2, 0.2]])
    target = torch.tensor([[0.6, 0.5, 0.4, 0.4], [0.8, 0.8, 0.2, 0.2]])
    # box 1: L1 0.1; xyxy (.3,.3,.7,.7) vs (.4,.3,.8,.7): inter .12, union .20, enclosing .20 -> GIoU .6
    # box 2: L1 1.2; disjoint, union .08, enclosing (.1,.1,.9,.9) .64 -> GIoU -(.64 - .08) / .64 = -.875
    l1 = (0.1 + 1.2) / 2
    giou = ((1 - 0.6) + (1 + 0.875)) / 2
    loss = box_loss(pred, target, l1_weight=5.0, giou_weight=2.0)
    assert loss.l1.item() == pytest.approx(l1, abs=1e-6)
    assert loss.giou.item() == pytest.approx(giou, abs=1e-5)
    assert loss.total.item() == pytest.approx(5 * l1 + 2 * giou, abs=1e-5)


@pytest.mark.parametrize(
    "pred",
    [
        [[0.5, 0.5, 0.0, 0.0], [0.3, 0.3, 0.0, 0.2]],  # zero area (a point, a line)
        [[0.1, 0.1, 0.1, 0.1], [0.9, 0.1, 0.05, 0.05]],  # far from the targets, no overlap
        [[0.6, 0.6, 0.2, 0.2], [0.4, 0.6, 0.1, 0.1]],  # identical to the targets
    ],
    ids=["zero-area", "disjoint", "exact"],
)
def test_box_loss_gradients_are_finite_at_degenerate_predictions(pred):
    pred = torch.tensor(pred, requires_grad=True)
    target = torch.tensor([[0.6, 0.6, 0.2, 0.2], [0.4, 0.6, 0.1, 0.1]])
    loss = box_loss(pred, target)
    loss.total.backward()
    assert torch.isfinite(loss.total) and torch.isfinite(pred.grad).all()


def test_box_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="pred and target"):
        box_loss(torch.rand(2, 4), torch.rand(3, 4))


@pytest.mark.parametrize("scale", [0.1, 1.0, 30.0, 1e4])
def test_head_always_outputs_a_valid_box_inside_the_image(scale):
    torch.manual_seed(0)
    head = BoxHead(16)
    x = (torch.randn(256, 16) * scale).requires_grad_()
    box = head(x)
    cx, cy, w, h = box.unbind(-1)
    assert box.shape == (256, 4) and torch.isfinite(box).all()
    assert ((w >= 0) & (w <= 1) & (h >= 0) & (h <= 1)).all()
    assert (cx - w / 2 >= 0).all() and (cy - h / 2 >= 0).all()
    assert (cx + w / 2 <= 1 + 1e-6).all() and (cy + h / 2 <= 1 + 1e-6).all()
    box_loss(box, torch.tensor([[0.5, 0.5, 0.2, 0.2]]).expand(256, 4)).total.backward()
    assert torch.isfinite(x.grad).all()


def test_objective_rejects_bad_loss_weights(backbone):
    with pytest.raises(ValueError, match="l1_weight"):
        GroundingObjective(backbone, l1_weight=-1.0)
    with pytest.raises(ValueError, match="both 0"):
        GroundingObjective(backbone, l1_weight=0.0, giou_weight=0.0)


def test_forward_loss_encodes_the_phrase_not_the_caption(backbone, batch):
    objective = GroundingObjective(backbone)
    out = objective.forward_loss(batch, FeatureCache(backbone, batch))
    changed = dict(batch, input_ids=torch.zeros_like(batch["input_ids"]))
    again = objective.forward_loss(changed, FeatureCache(backbone, changed))
    assert set(out.logs) == {"loss", "l1", "giou"} and torch.isfinite(out.loss)
    assert again.loss.item() == pytest.approx(out.loss.item(), abs=1e-6)
    out.loss.backward()
    assert objective.head.mlp[0].weight.grad.abs().sum() > 0
    assert backbone.vision.vit.patch_embed.proj.weight.grad.abs().sum() > 0


def test_the_phrase_escapes_text_merging_unless_asked(make_backbone, batch):
    """With the backbone merging captions (`text_entry_r`, `text_r`), the phrase's boxes are those of the
    unmerged backbone; `merge_phrase` lets the merging reach the phrase."""
    backbone = make_backbone(merging=TokenMergingConfig(text_entry_r=3, text_r=2))
    objective, merged = GroundingObjective(backbone), GroundingObjective(backbone, merge_phrase=True)
    merged.head.load_state_dict(objective.head.state_dict())
    with torch.no_grad():
        boxes = objective.predict_boxes(batch, FeatureCache(backbone, batch))
        merged_boxes = merged.predict_boxes(batch, FeatureCache(backbone, batch))
        with backbone.merging_override(text_entry_r=0, text_r=0):
            plain = objective.predict_boxes(batch, FeatureCache(backbone, batch))
    assert torch.equal(boxes, plain) and not torch.allclose(merged_boxes, plain)


def test_a_batch_without_phrases_or_with_bad_boxes_fails_with_a_clear_error(backbone, batch):
    objective = GroundingObjective(backbone)
    captions_only = {k: v for k, v in batch.items() if k not in ("phrase_input_ids", "boxes")}
    with pytest.raises(KeyError, match="phrase_input_ids"):
        objective.forward_loss(captions_only, FeatureCache(backbone, captions_only))
    flat_boxes = dict(batch, boxes=batch["boxes"][:, :2])
    with pytest.raises(ValueError, match=r"batch\['boxes'\]"):
        objective.forward_loss(flat_boxes, FeatureCache(backbone, flat_boxes))


def test_validation_scores_are_acc50_and_miou_over_the_whole_split(backbone, batch, monkeypatch):
    objective = GroundingObjective(backbone)
    target = torch.tensor([0.5, 0.5, 0.4, 0.4])
    shifted_out = torch.tensor([0.9, 0.9, 0.2, 0.2])  # IoU 0
    quarter = torch.tensor([0.5, 0.5, 0.2, 0.2])  # inside, a quarter of the area: IoU 0.25
    shrunk = torch.tensor([0.5, 0.5, 0.32, 0.32])  # inside, 0.64 of the area: IoU 0.64
    batches = [([target, shifted_out], 2), ([quarter, shrunk, target], 3)]  # IoUs 1, 0 | .25, .64, 1
    for preds, size in batches:
        part = {k: v[:size] for k, v in batch.items()}
        part["boxes"] = target.expand(size, 4).clone()
        monkeypatch.setattr(objective, "predict_boxes", lambda b, f, p=preds: torch.stack(p))
        logs = objective.validation_update(part, FeatureCache(backbone, part))
        assert set(logs) == {"loss"}
    scores = objective.validation_scores()
    assert set(scores) == {"val/grounding/acc50", "val/grounding/miou"}
    assert scores["val/grounding/acc50"] == pytest.approx(3 / 5, abs=1e-6)
    assert scores["val/grounding/miou"] == pytest.approx((1 + 0 + 0.25 + 0.64 + 1) / 5, abs=1e-5)
    assert objective.validation_scores() == {}  # reset for the next validation run


def test_predict_and_validation_images(backbone, shapes):
    val = shapes.dataset("val")
    batch = shapes.collate([val[i % len(val)] for i in range(10)])
    objective = GroundingObjective(backbone).eval()
    boxes = objective.predict(batch, FeatureCache(backbone, batch))["boxes"]
    assert boxes.shape == (10, 4)
    images = objective.validation_images(batch, FeatureCache(backbone, batch))
    pictures = images["val/grounding/boxes"]
    assert set(images) == {"val/grounding/boxes"}
    assert pictures.dtype == torch.uint8 and pictures.shape[:3] == (8, 3, pictures.shape[2])
    assert pictures.shape[3] == 192 and pictures.shape[2] > 192  # 32 px x 6, plus the phrase band
    green = (pictures[:, 0] == 0) & (pictures[:, 1] == 255) & (pictures[:, 2] == 0)
    assert green.flatten(1).any(1).all()  # every picture shows its target box


@pytest.mark.slow
def test_short_run_grounds_phrases_far_above_chance(tmp_path, backbone, one_thread):
    steps, batch_size, num_val = 500, 32, 256
    source = ShapesSource(
        image_size=32, num_train=steps * batch_size, num_val=num_val, num_test=16, batch_size=batch_size
    )
    objective = GroundingObjective(backbone, optim=OptimConfig(lr=2e-3, warmup=0.05))
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    data = MultiTaskDataModule(sources={"shapes": source})
    trainer.fit(objective, datamodule=data)  # no validation while training: it only costs time here
    trainer.limit_val_batches = 1.0
    scores = trainer.validate(objective, datamodule=data, verbose=False)[0]

    train_boxes = torch.stack([source.dataset("train")[i]["box"] for i in range(512)])
    val_boxes = torch.stack([item["box"] for item in source.dataset("val")])
    mean_box = grounding_scores(train_boxes.mean(0).expand(num_val, 4), val_boxes)["acc50"]
    generator = torch.Generator().manual_seed(0)
    draws = torch.randint(len(train_boxes), (20, num_val), generator=generator)
    random_box = sum(grounding_scores(train_boxes[d], val_boxes)["acc50"] for d in draws) / len(draws)
    chance = max(mean_box, random_box)
    acc50, miou = scores["val/grounding/acc50"], scores["val/grounding/miou"]
    print(
        f"acc50 {acc50:.3f} miou {miou:.3f} | chance acc50: mean box {mean_box:.3f}, random box {random_box:.3f}"
    )
    assert {"val/grounding/loss", "val/grounding/acc50", "val/grounding/miou"} <= set(scores)
    assert acc50 >= max(4 * chance, chance + 0.1)


@pytest.mark.parametrize(
    ("detail", "merging"),
    [
        ("positions", TokenMergingConfig(vision_r=4)),
        ("inputs", TokenMergingConfig(vision_r=4)),
        ("tokens", TokenMergingConfig(vision_r=8, vision_unmerge=True)),
    ],
)
def test_boxes_read_the_patch_grid_only_when_the_vision_tower_merges(make_backbone, batch, detail, merging):
    """With vision merging the box head reads the patch grid (`FusionBackbone.patch_grid`), not the merged
    tokens; without merging `patch_grid` changes nothing."""
    backbone = make_backbone(merging=merging).eval()
    grid, merged = (
        GroundingObjective(backbone, patch_grid=detail),
        GroundingObjective(backbone, patch_grid="none"),
    )
    merged.head.load_state_dict(grid.head.state_dict())
    with torch.no_grad():
        features = FeatureCache(backbone, batch)
        grid_boxes, merged_boxes = grid.predict_boxes(batch, features), merged.predict_boxes(batch, features)
        image = backbone.patch_grid(features.image, detail)
        phrase = backbone.encode_text(batch["phrase_input_ids"], batch["phrase_attention_mask"])
        fused = backbone.fuse(image, phrase.tokens, phrase.attention_mask, merge_text=False)
        assert torch.allclose(grid_boxes, grid.head(fused[:, 0]), atol=1e-5)
        assert not torch.allclose(grid_boxes, merged_boxes, atol=1e-4)
        with backbone.merging_override(vision_r=0):
            features = FeatureCache(backbone, batch)
            assert torch.equal(grid.predict_boxes(batch, features), merged.predict_boxes(batch, features))
    with pytest.raises(ValueError, match="patch_grid"):
        GroundingObjective(backbone, patch_grid="pixels")
