"""A converted BLIP checkpoint gives in vlp what LAVIS's `BlipPretrain` gives: ITC similarities, ITM logits
(with and without the joint step's shortcuts: image keys and values once, a caption's first self-attention
shared, only [CLS] through the last layer), LM logits and the momentum model's features, to 1e-5, padded and
packed. The "checkpoint" is LAVIS's model with random weights (non-trivial norms and biases, the decoder's
own self-attention apart from the encoder's, momentum copies apart from the online model) saved as BLIP's
release files are."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from lavis_reference import bert_tokenizer, blip_pretrain, blip_tokenizer, official_checkpoint

import vlp.platform.model.packing as packing_module
from vlp.platform.model.backbone import ImageFeatures, first_token
from vlp.platform.model.blip import BlipBackbone
from vlp.platform.model.convert_blip import blip_architecture, convert_blip
from vlp.platform.model.decoder import shift_for_teacher_forcing
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


def vlp_blip(tokenizer, queue_size: int = 24) -> MultiTaskModule:
    """vlp's BLIP of the small reference size (`lavis_reference.BLIP_SMALL`)."""
    backbone = BlipBackbone(
        vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=2, heads=2),
        text=TextConfig(width=32, depth=0, heads=2, max_len=40, token_types=False),
        fusion=FusionConfig(depth=3, heads=2, norm="post", layer_norm_eps=1e-12),
        embed_dim=16,
        tokenizer=tokenizer,
        caption_decoder=True,
        temperature="clamped",
        momentum=MomentumConfig(0.995),
    )
    objectives = {
        "itc": partial(ITCObjective, queue_size=queue_size, alpha=0.4),
        "itm": ITMObjective,
        "caption": partial(CaptionObjective, label_smoothing=0.1),
    }
    return MultiTaskModule(backbone, objectives, mode="joint").eval()


def load_converted(module: MultiTaskModule, converted: dict) -> None:
    """Strict in effect: every key of the module is converted or an alias of a converted tensor."""
    everything = module.state_dict(keep_vars=True)
    unexpected = sorted(set(converted) - set(everything))
    assert not unexpected, unexpected
    converted_ids = {id(everything[k]) for k in converted}
    left = [k for k, v in everything.items() if k not in converted and id(v) not in converted_ids]
    assert not left, left
    shapes = [k for k, v in converted.items() if v.shape != everything[k].shape]
    assert not shapes, shapes
    module.load_state_dict(converted, strict=False)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(LAVIS BlipPretrain, vlp module loaded from its converted release-format file, tokenizer)."""
    reference = blip_pretrain()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(5)
        for _, momentum in reference.model_pairs:
            for p in momentum.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=generator))
    path = official_checkpoint(reference, tmp_path_factory.mktemp("blip") / "model_base.pth")
    tokenizer = bert_tokenizer()  # BlipBackbone adds [DEC] and [ENC]
    stored = torch.load(path, map_location="cpu", weights_only=True)
    module = vlp_blip(tokenizer)
    converted, fresh = convert_blip(stored, max_len=40, vocab_size=len(tokenizer))
    assert fresh == []
    load_converted(module, converted)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield reference, module, tokenizer, converted
    torch.set_num_threads(threads)


def batch(tokenizer, n: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    text = tokenizer(CAPTIONS[:n], padding="longest", return_tensors="pt")
    return torch.randn(n, 3, 32, 32), text.input_ids, text.attention_mask


@pytest.fixture(params=["padded", "packed"])
def packing(request, monkeypatch):
    monkeypatch.setattr(packing_module, "MIN_PADDING", 0.0 if request.param == "packed" else 2.0)
    return request.param


def test_blip_tokenizer_ids_match_lavis(pair):
    _, module, tokenizer, _ = pair
    reference = blip_tokenizer()
    assert len(tokenizer) == len(reference) == 30524
    assert module.backbone.decoder_token_id == reference.bos_token_id
    assert module.backbone.encoder_token_id == reference.enc_token_id


def test_unimodal_features_and_itc_similarities_equal_lavis(pair, packing):
    reference, module, tokenizer, _ = pair
    backbone = module.backbone
    images, ids, mask = batch(tokenizer)
    with torch.no_grad():
        image_tokens = reference.visual_encoder.forward_features(images)
        image_feat = F.normalize(reference.vision_proj(image_tokens[:, 0]), dim=-1)
        text_tokens = reference.text_encoder(ids, attention_mask=mask, mode="text").last_hidden_state
        text_feat = F.normalize(reference.text_proj(text_tokens[:, 0]), dim=-1)
        image, text = backbone.encode_image(images), backbone.encode_text(ids, mask)
        torch.testing.assert_close(image.embedding, image_feat, **TOL)
        real = mask.bool()
        unimodal = backbone.unimodal_tokens(ids, mask)
        torch.testing.assert_close(unimodal[real], text_tokens[real], **TOL)
        torch.testing.assert_close(text.embedding, text_feat, **TOL)
        sims = backbone.logit_scale() * image.embedding @ text.embedding.T
        torch.testing.assert_close(sims, image_feat @ text_feat.T / reference.temp, **TOL)
        # the momentum model's features
        momentum = backbone.momentum.backbone
        image_m = F.normalize(reference.vision_proj_m(reference.visual_encoder_m(images)[:, 0]), dim=-1)
        text_m = reference.text_encoder_m(ids, attention_mask=mask, mode="text").last_hidden_state
        text_m = F.normalize(reference.text_proj_m(text_m[:, 0]), dim=-1)
        torch.testing.assert_close(momentum.encode_image(images).embedding, image_m, **TOL)
        torch.testing.assert_close(momentum.encode_text(ids, mask).embedding, text_m, **TOL)
        assert not torch.allclose(text_m, text_feat, atol=1e-4)


@pytest.mark.parametrize("shortcuts", [False, True])
def test_itm_logits_equal_lavis(pair, packing, shortcuts):
    reference, module, tokenizer, _ = pair
    backbone, head = module.backbone, module.objectives["itm"].head
    images, ids, mask = batch(tokenizer, seed=1)
    image_index = torch.tensor([0, 1, 2, 3, 0, 2, 3, 1])
    text_index = torch.tensor([0, 1, 2, 3, 2, 0, 1, 3])
    with torch.no_grad():
        image_tokens = reference.visual_encoder.forward_features(images)
        encoder_ids = ids.clone()
        encoder_ids[:, 0] = blip_tokenizer().enc_token_id
        fused = reference.text_encoder(
            encoder_ids[text_index],
            attention_mask=mask[text_index],
            encoder_hidden_states=image_tokens[image_index],
            encoder_attention_mask=torch.ones(image_tokens[image_index].shape[:2], dtype=torch.long),
            return_dict=True,
        ).last_hidden_state
        expected = reference.itm_head(fused[:, 0])

        image, text = backbone.encode_image(images), backbone.encode_text(ids, mask)
        if shortcuts:
            attended = backbone.first_self_attention(text.tokens, mask)
            out = backbone.fuse(
                backbone.with_fusion_keys(image).take(image_index),
                attended[text_index],
                mask[text_index],
                positions=first_token(len(text_index), mask.device),
                self_attended=True,
            )
        else:
            plain = ImageFeatures(image.tokens, image.embedding)
            out = backbone.fuse(plain.take(image_index), text.tokens[text_index], mask[text_index])
        torch.testing.assert_close(head(out[:, 0]), expected, **TOL)


@pytest.mark.parametrize("shortcuts", [False, True])
def test_lm_logits_and_loss_equal_lavis(pair, packing, shortcuts):
    reference, module, tokenizer, _ = pair
    backbone = module.backbone
    images, ids, mask = batch(tokenizer, seed=2)
    with torch.no_grad():
        image_tokens = reference.visual_encoder.forward_features(images)
        decoder_ids = ids.clone()
        decoder_ids[:, 0] = blip_tokenizer().bos_token_id
        targets = decoder_ids.masked_fill(mask == 0, -100)
        out = reference.text_decoder(
            decoder_ids,
            attention_mask=mask,
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long),
            labels=targets,
            return_dict=True,
        )
        image = backbone.encode_image(images)
        if shortcuts:
            image = backbone.with_fusion_keys(image)
        inputs, inputs_mask, vlp_targets = shift_for_teacher_forcing(ids, mask)
        hidden = backbone.decode(image, inputs, inputs_mask)
        real = inputs_mask.bool()
        logits = backbone.decoder.logits(hidden)
        torch.testing.assert_close(logits[real], out.logits[:, :-1][real], **TOL)
        loss = backbone.decoder.loss(hidden, vlp_targets, label_smoothing=0.1)
        torch.testing.assert_close(loss, out.loss, **TOL)


def test_cached_generation_steps_equal_the_full_decoder_pass(pair):
    _, module, tokenizer, _ = pair
    backbone = module.backbone
    images, ids, mask = batch(tokenizer, seed=3)
    full = torch.ones_like(ids)
    with torch.no_grad():
        image = backbone.with_fusion_keys(backbone.encode_image(images))
        expected = backbone.decoder.logits(backbone.decode(image, ids, full))
        cache = backbone.start_decoding(image)
        steps = torch.stack([cache(ids[:, t]) for t in range(ids.shape[1])], dim=1)
    torch.testing.assert_close(steps, expected, **TOL)


def test_architecture_rebuilds_the_backbone(pair):
    _, module, tokenizer, converted = pair
    architecture = blip_architecture(converted, vision_heads=2, text_heads=2)
    assert architecture.pop("layout") == "blip"
    sections = {
        "vision": VisionConfig,
        "text": TextConfig,
        "fusion": FusionConfig,
        "momentum": MomentumConfig,
    }
    settings = {
        k: sections[k](**v) if k in sections and v is not None else v for k, v in architecture.items()
    }
    rebuilt = BlipBackbone(**settings, tokenizer=tokenizer)
    backbone_keys = {k[len("backbone.") :] for k in converted if k.startswith("backbone.")}
    assert set(rebuilt.state_dict()) == backbone_keys


@pytest.mark.slow
def test_vit_b16_bert_base_blip_converts_exactly(monkeypatch, one_thread):
    """BLIP's real sizes (ViT-B/16 at 224 + BERT-base, 12 layers with cross-attention, embed 256), two images:
    ITC similarities, ITM logits through the shortcuts, LM logits and the momentum embedding, packed."""
    monkeypatch.setattr(packing_module, "MIN_PADDING", 0.0)
    sizes = dict(image_size=224, patch_size=16, vision_width=768, vision_depth=12, vision_heads=12)
    reference = blip_pretrain(embed_dim=256, queue_size=32, text_width=768, text_layers=12, text_heads=12,
                              max_position=512, **sizes)  # fmt: skip
    tokenizer = bert_tokenizer()
    converted, _ = convert_blip(reference.state_dict(), max_len=40, vocab_size=30524)
    architecture = blip_architecture(converted)  # heads by default width / 64: 12 and 12
    assert architecture["vision"]["model"] == "vit_base_patch16_224" and architecture["fusion"]["depth"] == 12
    backbone = BlipBackbone(
        vision=VisionConfig(model="vit_base_patch16_224", image_size=224),
        text=TextConfig(width=768, depth=0, heads=12, max_len=40, token_types=False),
        fusion=FusionConfig(depth=12, heads=12, norm="post", layer_norm_eps=1e-12),
        embed_dim=256,
        tokenizer=tokenizer,
        caption_decoder=True,
        temperature="clamped",
        momentum=MomentumConfig(0.995),
    ).eval()
    backbone.load_state_dict(
        {k[len("backbone.") :]: v for k, v in converted.items() if k.startswith("backbone.")}
    )
    head = torch.nn.Linear(768, 2)
    head.load_state_dict(
        {k.split(".")[-1]: v for k, v in converted.items() if k.startswith("objectives.itm.head")}
    )
    torch.manual_seed(0)
    images = torch.randn(2, 3, 224, 224)
    text = tokenizer(CAPTIONS[1:3], padding="longest", return_tensors="pt")
    ids, mask = text.input_ids, text.attention_mask
    blip = blip_tokenizer()
    with torch.no_grad():
        image_tokens = reference.visual_encoder.forward_features(images)
        image_feat = F.normalize(reference.vision_proj(image_tokens[:, 0]), dim=-1)
        text_tokens = reference.text_encoder(ids, attention_mask=mask, mode="text").last_hidden_state
        text_feat = F.normalize(reference.text_proj(text_tokens[:, 0]), dim=-1)
        pairs = torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0])  # (image, text): two positives, one negative
        encoder_ids = ids.clone()
        encoder_ids[:, 0] = blip.enc_token_id
        ones = torch.ones(3, 197, dtype=torch.long)
        fused = reference.text_encoder(
            encoder_ids[pairs[1]], attention_mask=mask[pairs[1]], encoder_hidden_states=image_tokens[pairs[0]],
            encoder_attention_mask=ones,
        ).last_hidden_state  # fmt: skip
        decoder_ids = ids.clone()
        decoder_ids[:, 0] = blip.bos_token_id
        lm = reference.text_decoder(
            decoder_ids,
            attention_mask=mask,
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=ones[:2],
        ).logits[:, :-1]
        image_feat_m = F.normalize(reference.vision_proj_m(reference.visual_encoder_m(images)[:, 0]), dim=-1)

        image = backbone.with_fusion_keys(backbone.encode_image(images))
        features = backbone.encode_text(ids, mask)
        sims = backbone.logit_scale() * image.embedding @ features.embedding.T
        torch.testing.assert_close(sims, image_feat @ text_feat.T / reference.temp, **TOL)
        attended = backbone.first_self_attention(features.tokens, mask)
        out = backbone.fuse(
            image.take(pairs[0]), attended[pairs[1]], mask[pairs[1]], positions=first_token(3, mask.device),
            self_attended=True,
        )  # fmt: skip
        torch.testing.assert_close(head(out[:, 0]), reference.itm_head(fused[:, 0]), **TOL)
        inputs, inputs_mask, _ = shift_for_teacher_forcing(ids, mask)
        logits = backbone.decoder.logits(backbone.decode(image, inputs, inputs_mask))
        real = inputs_mask.bool()
        torch.testing.assert_close(logits[real], lm[real], **TOL)
        momentum = backbone.momentum.backbone.encode_image(images).embedding
        torch.testing.assert_close(momentum, image_feat_m, **TOL)
