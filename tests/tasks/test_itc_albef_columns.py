"""ITC with `score_against: momentum` (ALBEF's pretraining ITC): the objective's loss is LAVIS's formula on
its features, online rows against the momentum embeddings and the queue, and it still fills the queue."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlp.platform.model.backbone import FeatureCache
from vlp.platform.model.momentum import MomentumConfig
from vlp.tasks.itc import ITCObjective


def test_momentum_columns_follow_lavis(make_backbone, batch, one_thread):
    backbone = make_backbone(momentum=MomentumConfig())
    torch.manual_seed(7)
    with torch.no_grad():
        for param in backbone.momentum.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    objective = ITCObjective(backbone, alpha=0.4, queue_size=12, score_against="momentum").train()
    objective.queue.enqueue(
        torch.randn(4, 16), torch.randn(4, 16), batch["image_id"][:4]
    )  # same images: kept
    queue_image, queue_text, _ = (t.clone() for t in objective.queue.contents())
    features = FeatureCache(backbone, batch)
    loss = objective.forward_loss(batch, features).loss
    temp = 1 / backbone.logit_scale()
    image, text = features.image.embedding, features.text.embedding
    image_m, text_m = features.momentum_image.embedding, features.momentum_text.embedding
    image_all, text_all = torch.cat([image_m, queue_image]).t(), torch.cat([text_m, queue_text]).t()
    with torch.no_grad():  # albef_pretrain.py: targets from the momentum similarities, diagonal positives
        targets = torch.zeros(len(image), image_all.shape[1])
        targets.fill_diagonal_(1)
        i2t_targets = 0.4 * F.softmax(image_m @ text_all / temp, dim=1) + 0.6 * targets
        t2i_targets = 0.4 * F.softmax(text_m @ image_all / temp, dim=1) + 0.6 * targets
    loss_i2t = -torch.sum(F.log_softmax(image @ text_all / temp, dim=1) * i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(text @ image_all / temp, dim=1) * t2i_targets, dim=1).mean()
    reference = (loss_i2t + loss_t2i) / 2
    torch.testing.assert_close(loss, reference, atol=1e-6, rtol=1e-6)
    params = [backbone.log_logit_scale, backbone.vision_proj.weight, backbone.text_proj.weight]
    for got, want in zip(
        torch.autograd.grad(loss, params, retain_graph=True),
        torch.autograd.grad(reference, params),
        strict=True,
    ):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert int(objective.queue.filled) == 12  # 4 + the batch's 8
