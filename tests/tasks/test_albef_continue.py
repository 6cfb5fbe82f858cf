"""A converted ALBEF checkpoint continues pre-training as LAVIS does: after one AdamW step of ITM + MLM (with
momentum distillation) on both sides from the same state, the next step's ITM and MLM losses agree, and so
do the momentum model's features (ALBEF moves its momentum model at the start of each forward, vlp after
each optimizer step: one `momentum.update()` after loading lines the two up)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from albef_pair import CAPTIONS, albef_pair

from vlp.platform.model.backbone import FeatureCache
from vlp.tasks.mlm import IGNORE_INDEX


def test_converted_checkpoint_continues_pretraining_like_lavis(monkeypatch, one_thread):
    reference, module, tokenizer = albef_pair()
    reference.momentum = 0.995
    backbone = module.backbone
    assert not backbone.text.bert.embeddings.token_type_embeddings.weight.requires_grad  # token_types=False
    backbone.momentum.update()  # what LAVIS's first forward does to its momentum model before reading it
    monkeypatch.setattr(torch, "multinomial", lambda weights, n, **kw: weights.argmax(-1, keepdim=True))
    lavis_params = [p for p in reference.parameters() if p.requires_grad and p is not reference.temp]
    vlp_params = [p for n, p in module.named_parameters() if p.requires_grad and not n.endswith("temp")]
    lavis_opt = torch.optim.AdamW(lavis_params, lr=1e-3, weight_decay=0.0)
    vlp_opt = torch.optim.AdamW(vlp_params, lr=1e-3, weight_decay=0.0)

    torch.manual_seed(0)
    images = torch.randn(5, 3, 32, 32)
    text = tokenizer(CAPTIONS, padding="max_length", truncation=True, max_length=30, return_tensors="pt")
    ids, mask = text.input_ids, text.attention_mask
    batch = {"image": images, "input_ids": ids, "attention_mask": mask, "image_id": torch.arange(5)}
    losses = []
    for step in range(2):
        generator = torch.Generator().manual_seed(10 + step)
        selected = (torch.rand(ids.shape, generator=generator) < 0.3) & mask.bool()
        selected &= ids != tokenizer.cls_token_id
        masked = torch.where(selected, tokenizer.mask_token_id, ids)
        labels = torch.where(selected, ids, IGNORE_INDEX)
        reference.mask = lambda *args, m=masked, t=labels, **kwargs: (m.clone(), t.clone())
        samples = {"image": images, "text_input": CAPTIONS, "epoch": 2, "iters": 0, "num_iters_per_epoch": 1}
        out = reference(samples)
        (out.loss_itm + out.loss_mlm).backward()
        lavis_opt.step()
        lavis_opt.zero_grad()

        module.objectives["mlm"].mask = lambda batch, seeded=False, m=masked, t=labels: (m, t)
        features = FeatureCache(backbone, batch)
        itm = module.objectives["itm"].forward_loss(batch, features).loss
        mlm = module.objectives["mlm"].forward_loss(batch, features).loss
        with torch.no_grad():
            momentum_text = features.momentum_text.embedding
        (itm + mlm).backward()
        vlp_opt.step()
        vlp_opt.zero_grad()
        backbone.momentum.update()  # vlp's place for the EMA: after the optimizer step
        losses.append((itm.detach(), mlm.detach(), out.loss_itm.detach(), out.loss_mlm.detach()))
        with torch.no_grad():
            expected_m = reference.text_encoder_m.bert(
                ids, attention_mask=mask, mode="text"
            ).last_hidden_state
            expected_m = F.normalize(reference.text_proj_m(expected_m[:, 0]), dim=-1)
        torch.testing.assert_close(momentum_text, expected_m, atol=1e-5, rtol=1e-5)
    for itm, mlm, lavis_itm, lavis_mlm in losses:
        torch.testing.assert_close(itm, lavis_itm, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mlm, lavis_mlm, atol=1e-5, rtol=1e-5)
    assert abs(losses[1][1] - losses[0][1]) > 1e-3  # the step changed the model
