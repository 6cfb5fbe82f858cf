"""A converted ALBEF checkpoint continues pre-training as LAVIS does: vlp's joint step (`training_step`: ITC
with momentum distillation and the queue, ITM, MLM, all with ALBEF's options) gives LAVIS's total loss
`loss_itc + loss_itm + loss_mlm` from the converted state, and after one AdamW step of both (the clamped
temperature learning too) the next step's losses agree, and so do the momentum model's features and the
queue (ALBEF moves its momentum model at the start of each forward, vlp after each optimizer step: one
`momentum.update()` after loading lines the two up)."""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from albef_pair import CAPTIONS, albef_pair

from vlp.platform.model.backbone import FeatureCache
from vlp.tasks.mlm import IGNORE_INDEX


def test_converted_checkpoint_continues_pretraining_like_lavis(monkeypatch, one_thread):
    reference, module, tokenizer = albef_pair(itc=True)
    reference.momentum = 0.995
    backbone = module.backbone
    assert not backbone.text.bert.embeddings.token_type_embeddings.weight.requires_grad  # token_types=False
    backbone.momentum.update()  # what LAVIS's first forward does to its momentum model before reading it
    monkeypatch.setattr(torch, "multinomial", lambda weights, n, **kw: weights.argmax(-1, keepdim=True))
    lavis_params = [p for p in reference.parameters() if p.requires_grad]
    vlp_params = [p for p in module.parameters() if p.requires_grad]
    assert any(p is backbone.temp for p in vlp_params) and any(p is reference.temp for p in lavis_params)
    lavis_opt = torch.optim.AdamW(lavis_params, lr=1e-3, weight_decay=0.02)
    vlp_opt = torch.optim.AdamW(vlp_params, lr=1e-3, weight_decay=0.02)

    torch.manual_seed(0)
    images = torch.randn(5, 3, 32, 32)
    text = tokenizer(CAPTIONS, padding="max_length", truncation=True, max_length=30, return_tensors="pt")
    ids, mask = text.input_ids, text.attention_mask
    batch = {"image": images, "input_ids": ids, "attention_mask": mask, "image_id": torch.arange(5)}
    itc = module.objectives["itc"]
    steps = []
    for step in range(2):
        generator = torch.Generator().manual_seed(10 + step)
        selected = (torch.rand(ids.shape, generator=generator) < 0.3) & mask.bool()
        selected &= ids != tokenizer.cls_token_id
        masked = torch.where(selected, tokenizer.mask_token_id, ids)
        labels = torch.where(selected, ids, IGNORE_INDEX)
        reference.mask = lambda *args, m=masked, t=labels, **kwargs: (m.clone(), t.clone())
        samples = {"image": images, "text_input": CAPTIONS, "epoch": 2, "iters": 0, "num_iters_per_epoch": 1}
        out = reference(samples)
        out.loss.backward()
        lavis_opt.step()
        lavis_opt.zero_grad()

        module.objectives["mlm"].mask = lambda batch, seeded=False, m=masked, t=labels: (m, t)
        with warnings.catch_warnings():  # self.log without a Trainer: a warning, nothing logged
            warnings.simplefilter("ignore")
            result = module.training_step(batch, step)
        result["loss"].backward()
        vlp_opt.step()
        vlp_opt.zero_grad()
        backbone.momentum.update()  # vlp's place for the EMA: after the optimizer step
        ours = result["objective_losses"]
        steps.append(
            (
                (result["loss"].detach(), ours["itc"], ours["itm"], ours["mlm"]),
                (out.loss.detach(), out.loss_itc.detach(), out.loss_itm.detach(), out.loss_mlm.detach()),
            )
        )
        with torch.no_grad():  # after the step: the momentum model LAVIS's next forward reads
            ahead = copy.deepcopy(reference)
            ahead._momentum_update()
            expected_m = ahead.text_encoder_m.bert(ids, attention_mask=mask, mode="text").last_hidden_state
            expected_m = F.normalize(ahead.text_proj_m(expected_m[:, 0]), dim=-1)
            momentum_text = FeatureCache(backbone.momentum.backbone, batch).text.embedding
        torch.testing.assert_close(momentum_text, expected_m, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(itc.queue.image, reference.image_queue.T, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(itc.queue.text, reference.text_queue.T, atol=1e-6, rtol=1e-6)
        assert int(itc.queue.pointer) == int(reference.queue_ptr)
        torch.testing.assert_close(backbone.temp.detach(), reference.temp.detach(), atol=1e-7, rtol=1e-6)
    for ours, lavis in steps:
        for got, want in zip(ours, lavis, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert abs(steps[1][0][0] - steps[0][0][0]) > 1e-3  # the step changed the model
