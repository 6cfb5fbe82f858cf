"""Momentum distillation and the feature queue in the objectives, against references written here: ITC with
alpha = 0 and an empty queue is today's ITC, ITC with a queue and soft targets, MLM and captioning distilled
from the momentum model's token distributions, and the queue filled by training steps only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from step_only import at_step

from vlp.platform.kernels import contrastive_loss_reference
from vlp.platform.model.backbone import FeatureCache
from vlp.platform.model.momentum import MomentumConfig
from vlp.tasks.caption import CaptionObjective
from vlp.tasks.itc import ITCObjective
from vlp.tasks.mlm import IGNORE_INDEX, MLMObjective


def nudge_momentum(backbone, scale: float = 0.05) -> None:
    """Make the momentum copy differ from the online model, so its soft targets are its own."""
    torch.manual_seed(7)
    with torch.no_grad():
        for param in backbone.momentum.parameters():
            param.add_(torch.randn_like(param) * scale)


def test_itc_with_alpha_zero_and_an_empty_queue_is_todays_itc(make_backbone, batch, one_thread):
    backbone = make_backbone(momentum=MomentumConfig())
    objective = ITCObjective(backbone, queue_size=32).train()
    features = FeatureCache(backbone, batch)
    loss = objective.forward_loss(batch, features).loss
    reference = contrastive_loss_reference(
        features.image.embedding, features.text.embedding, backbone.logit_scale()
    )
    torch.testing.assert_close(loss, reference, atol=1e-6, rtol=1e-6)
    params = [backbone.log_logit_scale, backbone.vision_proj.weight, backbone.text_proj.weight]
    for got, want in zip(
        torch.autograd.grad(loss, params, retain_graph=True),
        torch.autograd.grad(reference, params),
        strict=True,
    ):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert int(objective.queue.filled) == 8  # the training step enqueued its momentum embeddings


def test_itc_with_a_queue_and_soft_targets_matches_a_row_by_row_reference(make_backbone, batch, one_thread):
    backbone = make_backbone(momentum=MomentumConfig())
    nudge_momentum(backbone)
    objective = ITCObjective(backbone, alpha=0.4, queue_size=12).train()
    first = {**batch, "image_id": batch["image_id"] + 1000}  # other images: their rows stay in the queue
    objective.forward_loss(first, FeatureCache(backbone, first))
    # the queue now holds the momentum embeddings of `first`; enqueue one row of an image of `batch` too
    objective.queue.enqueue(torch.randn(1, 16), torch.randn(1, 16), batch["image_id"][:1])
    queued_image, queued_text, queued_ids = (t.clone() for t in objective.queue.contents())
    features = FeatureCache(backbone, batch)
    loss = objective.forward_loss(batch, features).loss
    s = backbone.logit_scale().detach()
    image, text = features.image.embedding.detach(), features.text.embedding.detach()
    image_m, text_m = features.momentum_image.embedding, features.momentum_text.embedding
    ids = batch["image_id"].tolist()
    total = 0.0
    for direction in ("i2t", "t2i"):
        for i in range(len(ids)):
            query, query_m = (image[i], image_m[i]) if direction == "i2t" else (text[i], text_m[i])
            keys = list(text if direction == "i2t" else image)
            keys_m = list(text_m if direction == "i2t" else image_m)
            for row, row_id in enumerate(queued_ids.tolist()):
                if row_id != ids[i]:  # a queued row of the same image is left out
                    keys.append((queued_text if direction == "i2t" else queued_image)[row])
                    keys_m.append((queued_text if direction == "i2t" else queued_image)[row])
            logits = torch.stack([s * query @ k for k in keys])
            soft = torch.stack([s * query_m @ k for k in keys_m]).softmax(0)
            targets = 0.4 * soft + 0.6 * F.one_hot(torch.tensor(i), len(keys)).float()
            total += -(targets * logits.log_softmax(0)).sum()
    reference = total / (2 * len(ids))
    torch.testing.assert_close(loss.detach(), reference, atol=1e-5, rtol=1e-5)
    assert queued_ids.numel() == 9


def test_itc_validation_does_not_fill_the_queue(make_backbone, batch):
    backbone = make_backbone(momentum=MomentumConfig())
    objective = ITCObjective(backbone, alpha=0.4, queue_size=16).eval()
    with torch.no_grad():
        objective.forward_loss(batch, FeatureCache(backbone, batch))
        objective.validation_update(batch, FeatureCache(backbone, batch))
    assert int(objective.queue.filled) == 0


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_mlm_distils_from_the_momentum_models_token_distributions(
    make_backbone, batch, monkeypatch, one_thread, alpha
):
    backbone = make_backbone(momentum=MomentumConfig())
    objective = MLMObjective(backbone, alpha=0.4, alpha_warmup_steps=10)
    nudge_momentum(backbone)
    torch.manual_seed(0)
    step = 10 if alpha else 0  # the ramp: alpha 0 at step 0, 0.4 from step 10 on
    loss = at_step(objective, step).forward_loss(batch, FeatureCache(backbone, batch)).loss
    torch.manual_seed(0)
    masked, labels = objective.mask(batch)
    selected = labels != IGNORE_INDEX

    def logits_of(model, head):
        image = model.encode_image(batch["image"])
        fused = model.fuse(
            image, model.text(masked, batch["attention_mask"]), batch["attention_mask"], merge_text=False
        )
        return head(fused[selected]) @ model.text.word_embeddings.weight.T + head.bias

    logits = logits_of(backbone, objective.head)
    with torch.no_grad():
        soft = logits_of(backbone.momentum.backbone, objective.momentum_head).softmax(-1)
    hard = F.cross_entropy(logits, labels[selected])
    reference = (1 - alpha) * hard + alpha * -(soft * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)


def test_caption_distils_from_the_momentum_decoder(make_backbone, batch, one_thread):
    backbone = make_backbone(momentum=MomentumConfig(), caption_decoder=True)
    objective = CaptionObjective(backbone, alpha=0.3)
    nudge_momentum(backbone)
    loss = objective.forward_loss(batch, FeatureCache(backbone, batch)).loss
    ids, mask = batch["input_ids"], batch["attention_mask"]
    keep = mask[:, 1:].bool()
    targets = ids[:, 1:][keep]

    def logits_of(model):
        hidden = model.decode(model.encode_image(batch["image"]), ids[:, :-1], mask[:, :-1])
        return model.decoder.logits(hidden[keep])

    logits = logits_of(backbone)
    with torch.no_grad():
        soft = logits_of(backbone.momentum.backbone).softmax(-1)
    reference = 0.7 * F.cross_entropy(logits, targets) + 0.3 * -(soft * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)


def test_distillation_without_a_momentum_model_is_a_clear_error(make_backbone):
    with pytest.raises(ValueError, match="momentum"):
        MLMObjective(make_backbone(), alpha=0.4)
    with pytest.raises(ValueError, match="momentum"):
        CaptionObjective(make_backbone(caption_decoder=True), alpha=0.4)
    with pytest.raises(ValueError, match="alpha"):
        MLMObjective(make_backbone(momentum=MomentumConfig()), alpha=1.5)
