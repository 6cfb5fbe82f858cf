"""BLIP's pre-training step in vlp equals LAVIS's `BlipPretrain.forward` on converted weights: the same ITC
loss (momentum distillation with the alpha ramp, the queue), the same ITM negative weights (softmax + 1e-4,
own pair at zero) and, for the same negatives, the same ITM loss, the same LM loss (label smoothing 0.1) and
the same gradients; the captioner's prompt ("a picture of ") is not scored, as in LAVIS's `BlipCaption`."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from lavis_reference import bert_tokenizer, blip_caption, blip_pretrain, blip_tokenizer
from step_only import at_step

from vlp.platform.model.backbone import FeatureCache
from vlp.platform.model.blip import BlipBackbone
from vlp.platform.model.convert_blip import convert_blip
from vlp.platform.model.encoders import TextConfig, VisionConfig
from vlp.platform.model.fusion import FusionConfig
from vlp.platform.model.momentum import MomentumConfig
from vlp.tasks.caption import CaptionObjective
from vlp.tasks.itc import ITCObjective
from vlp.tasks.itm import ITMObjective
from vlp.tasks.multitask import MultiTaskModule

CAPTIONS = [
    "a red square left of a blue circle",
    "two dogs",
    "a small green triangle above a large yellow square on grey",
    "the cat sleeps",
]
TOL = dict(atol=1e-5, rtol=1e-5)


def blip_backbone(tokenizer, **changes) -> BlipBackbone:
    settings = dict(
        vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=2, heads=2),
        text=TextConfig(width=32, depth=0, heads=2, max_len=40, token_types=False),
        fusion=FusionConfig(depth=3, heads=2, norm="post", layer_norm_eps=1e-12),
        embed_dim=16,
        tokenizer=tokenizer,
        caption_decoder=True,
        temperature="clamped",
    )
    return BlipBackbone(**(settings | changes))


class Draws:
    """torch.multinomial stand-in: records each row's weights (normalised) and takes the heaviest."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []

    def __call__(self, weights: torch.Tensor, n: int, *args, **kwargs) -> torch.Tensor:
        rows = weights.reshape(-1, weights.shape[-1])
        self.rows += list(rows / rows.sum(-1, keepdim=True))
        return weights.argmax(-1, keepdim=True)


def test_pretraining_losses_negatives_and_gradients_equal_lavis(one_thread, monkeypatch):
    reference = blip_pretrain()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(5)
        for _, momentum in reference.model_pairs:
            for p in momentum.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=generator))
    tokenizer = bert_tokenizer()
    converted, _ = convert_blip(reference.state_dict(), max_len=40, vocab_size=30524)
    backbone = blip_backbone(tokenizer, momentum=MomentumConfig(0.995))
    objectives = {
        "itc": partial(
            ITCObjective, alpha=0.4, alpha_warmup_steps=20, queue_size=24, score_against="momentum"
        ),
        "itm": partial(ITMObjective, negatives="blip"),
        "caption": partial(CaptionObjective, label_smoothing=0.1),
    }
    module = MultiTaskModule(backbone, objectives, mode="joint")
    assert not module.load_state_dict(converted, strict=False).unexpected_keys  # coverage: test_blip_lavis

    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    # LAVIS: alpha = 0.4 * (epoch * n + iters) / (2 n) = 0.1; vlp: 0.4 * step / alpha_warmup_steps = 0.1
    samples = {"image": images, "text_input": CAPTIONS, "epoch": 0, "iters": 5, "num_iters_per_epoch": 10}
    lavis_draws, vlp_draws = Draws(), Draws()
    monkeypatch.setattr(torch, "multinomial", lavis_draws)
    expected = reference(samples)  # moves its momentum model first, then the step
    expected.loss.backward()

    text = tokenizer(CAPTIONS, padding="longest", return_tensors="pt")
    batch = {"image": images, "input_ids": text.input_ids, "attention_mask": text.attention_mask,
             "image_id": torch.arange(4)}  # fmt: skip
    at_step(module, 5)  # the objectives read the step from the trainer MultiTaskModule shares
    backbone.momentum.update()  # ALBEF / BLIP move the momentum model at the start of a step, vlp after
    monkeypatch.setattr(torch, "multinomial", vlp_draws)
    features = FeatureCache(backbone, batch)
    losses = {
        name: objective.forward_loss(batch, features).loss for name, objective in module.objectives.items()
    }
    sum(losses.values()).backward()

    # LAVIS draws a negative image per text first, then a negative text per image; vlp the other way round
    lavis_t2i, lavis_i2t = torch.stack(lavis_draws.rows[:4]), torch.stack(lavis_draws.rows[4:])
    vlp_i2t, vlp_t2i = torch.stack(vlp_draws.rows[:4]), torch.stack(vlp_draws.rows[4:])
    torch.testing.assert_close(vlp_i2t, lavis_i2t, **TOL)
    torch.testing.assert_close(vlp_t2i, lavis_t2i, **TOL)
    assert (vlp_i2t.diagonal() == 0).all() and (vlp_i2t + torch.eye(4) > 0).all()  # the 1e-4 floor
    torch.testing.assert_close(losses["itc"], expected.loss_itc, **TOL)
    torch.testing.assert_close(losses["itm"], expected.loss_itm, **TOL)
    torch.testing.assert_close(losses["caption"], expected.loss_lm, **TOL)

    encoder, decoder = reference.text_encoder.encoder.layer, reference.text_decoder.bert.encoder.layer
    pairs = {
        "visual patch embedding": (reference.visual_encoder.patch_embed.proj.weight,
                                   backbone.vision.vit.patch_embed.proj.weight.grad),
        "word embeddings": (reference.text_encoder.embeddings.word_embeddings.weight,
                            backbone.text.word_embeddings.weight.grad),
        "cross-attention query": (encoder[1].crossattention.self.query.weight,
                                  backbone.fusion.layers[1].cross_attn.query.weight.grad),
        "encoder self-attention key": (encoder[2].attention.self.key.weight,
                                       backbone.fusion.layers[2].self_attn.key_value.weight.grad[:32]),
        "feed-forward": (encoder[0].intermediate.dense.weight, backbone.fusion.layers[0].mlp[0].weight.grad),
        "decoder self-attention LayerNorm": (decoder[0].attention.output.LayerNorm.weight,
                                             backbone.decoder.self_norms[0].weight.grad),
        "LM transform": (reference.text_decoder.cls.predictions.transform.dense.weight,
                         backbone.decoder.transform[0].weight.grad),
        "ITM head": (reference.itm_head.weight, module.objectives["itm"].head.weight.grad),
        "text projection": (reference.text_proj.weight, backbone.text_proj.weight.grad),
        "temperature": (reference.temp, backbone.temp.grad),
    }  # fmt: skip
    for name, (theirs, ours) in pairs.items():  # (LAVIS parameter, vlp gradient)
        torch.testing.assert_close(ours, theirs.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("prompt", ["a picture of ", ""])
def test_caption_prompt_is_not_scored_as_in_lavis_blip_caption(one_thread, prompt):
    reference = blip_caption(prompt=prompt)
    tokenizer = bert_tokenizer()
    converted, _ = convert_blip(reference.state_dict(), max_len=40, embed_dim=16)
    backbone = blip_backbone(tokenizer).eval()
    backbone.load_state_dict({k[len("backbone.") :]: v for k, v in converted.items()})
    objective = CaptionObjective(backbone, label_smoothing=0.1, prompt=prompt)
    assert objective.prompt_ids == blip_tokenizer()(prompt, add_special_tokens=False).input_ids
    torch.manual_seed(1)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        # LAVIS's caption processor prefixes the prompt; the model ignores its first prompt_length targets
        expected = reference({"image": images, "text_input": [prompt + c for c in CAPTIONS]}).loss
        text = tokenizer(CAPTIONS, padding="longest", return_tensors="pt")
        batch = {"image": images, "input_ids": text.input_ids, "attention_mask": text.attention_mask}
        loss = objective.forward_loss(batch, FeatureCache(backbone, batch)).loss
    torch.testing.assert_close(loss, expected, **TOL)
