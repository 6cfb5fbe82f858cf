"""ALBEF's ITM and MLM options equal LAVIS's `AlbefPretrain.forward` on a converted checkpoint: with the same
negatives drawn and the same tokens masked on both sides, the same ITM and MLM (momentum-distilled) losses
and the same gradient on every parameter; and the options draw as ALBEF does (ITM: local batch, online
against momentum similarities, own pair excluded; MLM: all but [PAD] and [CLS], any vocabulary id)."""

from __future__ import annotations

import pytest
import torch
from albef_pair import CAPTIONS, albef_pair, lavis_gradients

from vlp.platform.model.backbone import FeatureCache
from vlp.tasks.itm import ITMObjective
from vlp.tasks.mlm import IGNORE_INDEX, MLMObjective


def test_albef_itm_and_mlm_losses_and_gradients_equal_lavis(monkeypatch, one_thread):
    reference, module, tokenizer = albef_pair()
    torch.manual_seed(0)
    images = torch.randn(5, 3, 32, 32)
    text = tokenizer(CAPTIONS, padding="max_length", truncation=True, max_length=30, return_tensors="pt")
    ids, mask = text.input_ids, text.attention_mask
    generator = torch.Generator().manual_seed(3)
    selected = (
        (torch.rand(ids.shape, generator=generator) < 0.3) & mask.bool() & (ids != tokenizer.cls_token_id)
    )
    masked = torch.where(selected, tokenizer.mask_token_id, ids)
    masked[0, 2] = 1234 if selected[0, 2] else masked[0, 2]  # a random replacement
    labels = torch.where(selected, ids, IGNORE_INDEX)
    # the same negatives on both sides: each draw takes its most probable candidate
    monkeypatch.setattr(torch, "multinomial", lambda weights, n, **kw: weights.argmax(-1, keepdim=True))
    reference.mask = lambda input_ids, *args, targets=None, **kwargs: (masked.clone(), labels.clone())
    out = reference(
        {"image": images, "text_input": CAPTIONS, "epoch": 2, "iters": 0, "num_iters_per_epoch": 1}
    )
    (out.loss_itm + out.loss_mlm).backward()

    batch = {"image": images, "input_ids": ids, "attention_mask": mask, "image_id": torch.arange(5)}
    module.objectives["mlm"].mask = lambda batch, seeded=False: (masked, labels)
    features = FeatureCache(module.backbone, batch)
    itm = module.objectives["itm"].forward_loss(batch, features).loss
    mlm = module.objectives["mlm"].forward_loss(batch, features).loss
    torch.testing.assert_close(itm, out.loss_itm, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mlm, out.loss_mlm, atol=1e-5, rtol=1e-5)
    (itm + mlm).backward()

    expected = lavis_gradients(reference)
    params = dict(module.named_parameters())
    compared = 0
    for key, grad in expected.items():
        if key.endswith("token_type_embeddings.weight") or key not in params:
            continue  # vlp's zero token-type row has a gradient, ALBEF has no such row
        ours = params[key].grad
        ours = torch.zeros_like(params[key]) if ours is None else ours
        torch.testing.assert_close(ours, grad.to(ours.dtype), atol=2e-5, rtol=1e-4, msg=key)
        compared += 1
    assert compared > 80


def test_albef_negatives_are_drawn_from_online_against_momentum_similarities(monkeypatch):
    _, module, tokenizer = albef_pair()
    backbone = module.backbone
    text = tokenizer(CAPTIONS[:4], padding="longest", return_tensors="pt")
    batch = {
        "image": torch.randn(4, 3, 32, 32),
        "input_ids": text.input_ids,
        "attention_mask": text.attention_mask,
        "image_id": torch.tensor([0, 0, 1, 2]),  # rows 0 and 1 show the same image: ALBEF still draws them
    }
    seen = []
    monkeypatch.setattr(torch, "multinomial", lambda w, n, **kw: seen.append(w) or w.argmax(-1, keepdim=True))
    features = FeatureCache(backbone, batch)
    pairs = module.objectives["itm"].forward_loss(batch, features)
    assert pairs.loss.isfinite()
    with torch.no_grad():
        image, text_m = features.image.embedding, features.momentum_text.embedding
        expected = (backbone.logit_scale() * image @ text_m.T).fill_diagonal_(-torch.inf).softmax(1)
    torch.testing.assert_close(seen[0], expected)
    assert (seen[0].diagonal() == 0).all() and (seen[0][0, 1] > 0) and (seen[1].diagonal() == 0).all()


def test_albef_masking_masks_sep_never_cls_or_pad_and_replaces_from_the_whole_vocabulary():
    _, module, tokenizer = albef_pair()
    mlm = module.objectives["mlm"]
    text = tokenizer(CAPTIONS * 40, padding="longest", return_tensors="pt")
    batch = {"input_ids": text.input_ids, "attention_mask": text.attention_mask}
    torch.manual_seed(0)
    masked, labels = mlm.mask(batch)
    selected = labels != IGNORE_INDEX
    ids = text.input_ids
    assert (
        not selected[ids == tokenizer.cls_token_id].any()
        and not selected[ids == tokenizer.pad_token_id].any()
    )
    assert selected[ids == tokenizer.sep_token_id].any()
    share = selected.sum() / (text.attention_mask.sum() - len(ids))
    assert 0.12 < share < 0.18
    assert len(mlm.random_token_ids) == 30522
    with pytest.raises(ValueError, match="masking must be"):
        MLMObjective(module.backbone, masking="span")
    with pytest.raises(ValueError, match="negatives must be"):
        ITMObjective(module.backbone, negatives="hardest")
