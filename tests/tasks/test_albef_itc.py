"""ALBEF's ITC (momentum distillation, alpha 0.4, online features scored against the momentum model's
in-batch features plus the queue, clamped temperature) on a converted LAVIS `AlbefPretrain`, LAVIS's queue
copied over: the loss and every parameter's gradient equal LAVIS's `loss_itc`, and the queue after the step
equals LAVIS's `_dequeue_and_enqueue` (pointer mid-way, so the rows land where LAVIS puts them)."""

from __future__ import annotations

import pytest
import torch
from albef_pair import CAPTIONS, QUEUE_SIZE, albef_pair, lavis_gradients

from vlp.platform.model.backbone import FeatureCache


@pytest.mark.parametrize("temp", [0.11, 0.7])  # inside [0.001, 0.5], and above it: both read 0.5
def test_albef_itc_loss_gradients_and_queue_equal_lavis(temp, one_thread):
    reference, module, tokenizer = albef_pair(itc=True)
    reference.momentum = 0.995
    with torch.no_grad():
        reference.temp.fill_(temp)
        module.backbone.temp.fill_(temp)
    module.backbone.momentum.update()  # what LAVIS's forward does to its momentum model before reading it
    itc = module.objectives["itc"]
    assert itc.alpha == 0.4 and itc.score_against == "momentum" and int(itc.queue.filled) == QUEUE_SIZE
    torch.testing.assert_close(itc.queue.image, reference.image_queue.T, atol=0, rtol=0)
    torch.manual_seed(0)
    images = torch.randn(5, 3, 32, 32)
    out = reference(
        {"image": images, "text_input": CAPTIONS, "epoch": 2, "iters": 0, "num_iters_per_epoch": 1}
    )
    out.loss_itc.backward()

    text = tokenizer(CAPTIONS, padding="max_length", truncation=True, max_length=30, return_tensors="pt")
    batch = {
        "image": images,
        "input_ids": text.input_ids,
        "attention_mask": text.attention_mask,
        "image_id": torch.arange(5),
    }
    loss = itc.forward_loss(batch, FeatureCache(module.backbone, batch)).loss
    torch.testing.assert_close(loss, out.loss_itc, atol=1e-5, rtol=1e-5)
    loss.backward()

    params = dict(module.named_parameters())
    compared = 0
    for key, grad in lavis_gradients(reference).items():
        if key.endswith("token_type_embeddings.weight") or key not in params:
            continue  # vlp's zero token-type row has a gradient, ALBEF has no such row
        ours = params[key].grad
        ours = torch.zeros_like(params[key]) if ours is None else ours
        torch.testing.assert_close(ours, grad.to(ours.dtype), atol=2e-5, rtol=1e-4, msg=key)
        compared += 1
    assert compared > 50
    assert params["backbone.temp"].grad.abs() > 1e-3  # the temperature learns, clamped or not
    assert params["backbone.vision.vit.patch_embed.proj.weight"].grad.abs().max() > 1e-4

    # the queue: the step's 5 momentum rows at LAVIS's pointer (10..14), pointer moved to 15
    assert int(reference.queue_ptr) == 15 and int(itc.queue.pointer) == 15
    torch.testing.assert_close(itc.queue.image, reference.image_queue.T, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(itc.queue.text, reference.text_queue.T, atol=1e-6, rtol=1e-6)
    assert int(itc.queue.filled) == QUEUE_SIZE
