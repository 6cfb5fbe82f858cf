"""BLIP's caption settings with the bootstrap branch's search options: 3 beams, max 20 and min 5 tokens counting
[DEC] and the prompt (vlp: 16 and 1 after them), repetition penalty, against LAVIS's `BlipCaption.generate`."""

from __future__ import annotations

import pytest
import torch
from lavis_reference import bert_tokenizer, blip_caption, with_generate

from vlp.platform.model.blip import BlipBackbone
from vlp.platform.model.convert_blip import convert_blip
from vlp.platform.model.encoders import TextConfig, VisionConfig
from vlp.platform.model.fusion import FusionConfig
from vlp.tasks.caption import CaptionObjective

PROMPT, PROMPT_TOKENS = "a picture of ", 4  # [DEC] a picture of


# [SEP] made likelier (sep_boost) so that the minimum length decides captions; with a stronger boost (0.6) the
# search ends a beam by transformers' default stopping, which `early_stopping: heuristic` follows (the exact
# bound would go on to a longer caption of a better score).
@pytest.mark.parametrize(
    ("num_beams", "repetition_penalty", "sep_boost"),
    [(3, 1.0, 1.0), (3, 1.0, 0.6), (1, 1.0, 1.0), (1, 1.3, 1.0)],
)
def test_blip_beam_settings_equal_lavis_generate(num_beams, repetition_penalty, sep_boost, one_thread):
    reference = with_generate(blip_caption(prompt=PROMPT, seed=3))
    with torch.no_grad():
        for layer in reference.text_decoder.bert.encoder.layer:
            layer.crossattention.output.dense.weight.mul_(20.0)
        reference.text_decoder.cls.predictions.bias[102] += (
            sep_boost  # [SEP] likely early: min_length matters
        )
    converted, _ = convert_blip(reference.state_dict(), max_len=40, embed_dim=16)
    backbone = BlipBackbone(
        vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=2, heads=2),
        text=TextConfig(width=32, depth=0, heads=2, max_len=40, token_types=False),
        fusion=FusionConfig(depth=3, heads=2, norm="post", layer_norm_eps=1e-12),
        embed_dim=16,
        tokenizer=bert_tokenizer(),
        caption_decoder=True,
        temperature="clamped",
    ).eval()
    backbone.load_state_dict({k[len("backbone.") :]: v for k, v in converted.items()})
    objective = CaptionObjective(
        backbone,
        num_beams=num_beams,
        max_length=20 - PROMPT_TOKENS,
        min_length=5 - (PROMPT_TOKENS - 1),
        repetition_penalty=repetition_penalty,
        prompt=PROMPT,
        early_stopping="heuristic",
    )
    torch.manual_seed(0)
    images = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        expected = reference.generate(
            {"image": images},
            num_beams=num_beams,
            max_length=20,
            min_length=5,
            repetition_penalty=repetition_penalty,
        )
        ids = objective.generate(backbone.encode_image(images))
        no_min = CaptionObjective(backbone, num_beams=num_beams, max_length=16, prompt=PROMPT).generate(
            backbone.encode_image(images)
        )
    prompt = torch.tensor(objective.prompt_ids).expand(len(ids), -1)
    decoded = backbone.tokenizer.batch_decode(torch.cat([prompt, ids], 1), skip_special_tokens=True)
    if sep_boost == 1.0:  # without the minimum: [SEP] at once, so the minimum decides every caption
        assert [int((row != 0).sum()) for row in no_min] == [1] * len(ids)
    assert [t[len(PROMPT) :] for t in decoded] == expected
