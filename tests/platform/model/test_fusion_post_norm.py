"""The post-norm (BERT / ALBEF) fusion block: its math written out, and every shortcut of the fused passes
(precomputed image keys and values, selected queries, a caption's first self-attention shared, packing,
the cached decoder step) exact under it, as they are for pre-norm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vlp.platform.model.packing as packing_module
from vlp.platform.model.decoder import CaptionDecoder
from vlp.platform.model.encoders import TextConfig, TextEncoder
from vlp.platform.model.fusion import FusionConfig, FusionEncoder, FusionLayer


def post_norm_stack(seed: int = 0, depth: int = 3) -> FusionEncoder:
    torch.manual_seed(seed)
    fusion = FusionEncoder(
        FusionConfig(depth=depth, heads=2, norm="post", layer_norm_eps=1e-12), dim=16, image_dim=24
    ).eval()
    with torch.no_grad():  # non-trivial norms, so a misplaced LayerNorm shows
        for module in fusion.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.3)
                module.bias.normal_(0.0, 0.3)
    return fusion


def inputs(seed: int = 0):
    torch.manual_seed(100 + seed)
    text = torch.randn(5, 7, 16)
    mask = torch.ones(5, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    mask[4, 5:] = 0
    return text, mask, torch.randn(5, 6, 24), torch.randn(5, 6)


def attention(x, context, project_q, project_kv, out, heads, mask=None):
    q = project_q(x)
    k, v = project_kv(context).chunk(2, dim=-1)
    b, n, d = q.shape

    def split(t):
        return t.view(b, -1, heads, d // heads).transpose(1, 2)

    scores = split(q) @ split(k).transpose(-2, -1) / (d // heads) ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, -torch.inf) if mask.dtype == torch.bool else scores + mask
    return out((scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, n, d))


def bert_layer(layer: FusionLayer, text, image, key_mask, bias):
    """BERT's layer with cross-attention, written out: LN(h + f(h)) after each sub-block."""
    s, c = layer.self_attn, layer.cross_attn
    h = layer.self_norm(text + attention(text, text, s.query, s.key_value, s.out, s.heads, key_mask))
    h = layer.cross_norm(h + attention(h, image, c.query, c.key_value, c.out, c.heads, bias))
    return layer.mlp_norm(h + layer.mlp[3](F.gelu(layer.mlp[0](h))))


def test_post_norm_layer_is_bert_layer_with_cross_attention_and_no_final_norm():
    fusion = post_norm_stack()
    text, mask, image, bias = inputs()
    assert not [k for k in fusion.state_dict() if k.startswith("norm.")]
    expected = text
    for layer in fusion.layers:
        expected = bert_layer(layer, expected, image, mask.bool()[:, None, None, :], bias[:, None, None, :])
    out = fusion(text, mask, image, image_bias=bias)
    real = mask.bool()
    torch.testing.assert_close(out[real], expected[real], atol=1e-5, rtol=1e-5)
    assert fusion.layers[0].self_norm.eps == 1e-12


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_post_norm_shortcuts_equal_the_full_forward(monkeypatch, packed, causal):
    monkeypatch.setattr(packing_module, "MIN_PADDING", 0.0 if packed else 2.0)
    fusion = post_norm_stack(1)
    text, mask, image, bias = inputs(1)
    full = fusion(text, mask, image, image_bias=bias, causal=causal)
    cached = fusion(text, mask, None, image_bias=bias, image_kv=fusion.image_key_values(image), causal=causal)
    real = mask.bool()
    torch.testing.assert_close(cached[real], full[real], atol=1e-5, rtol=1e-5)
    positions = torch.tensor([[0, 3], [2, 2], [6, 1], [0, 1], [4, 0]])
    some = fusion(text, mask, image, image_bias=bias, causal=causal, positions=positions)
    rows = full.gather(1, positions[..., None].expand(-1, -1, 16))
    picked_real = real.gather(1, positions)
    torch.testing.assert_close(some[picked_real], rows[picked_real], atol=1e-5, rtol=1e-5)


def test_post_norm_shared_first_self_attention_equals_fusing_each_pair():
    fusion = post_norm_stack(2)
    text, mask, image, _ = inputs(2)
    attended = fusion.first_self_attention(text, mask)
    texts, images = torch.tensor([0, 1, 1, 3, 4, 0]), torch.tensor([0, 1, 2, 2, 4, 3])
    kv = tuple((k[images], v[images]) for k, v in fusion.image_key_values(image))
    cls = torch.zeros(len(texts), 1, dtype=torch.long)
    shared = fusion(attended[texts], mask[texts], None, image_kv=kv, self_attended=True, positions=cls)
    for row, (t, i) in enumerate(zip(texts.tolist(), images.tolist(), strict=True)):
        n = int(mask[t].sum())
        alone = fusion(text[t : t + 1, :n], mask[t : t + 1, :n], image[i : i + 1])
        torch.testing.assert_close(shared[row, 0], alone[0, 0], atol=1e-5, rtol=1e-5)


def test_post_norm_cached_decoder_step_equals_the_causal_forward():
    fusion = post_norm_stack(3, depth=2)
    text = TextEncoder(TextConfig(width=16, depth=1, heads=2, max_len=12), vocab_size=50, pad_token_id=0)
    decoder = CaptionDecoder(text, fusion).eval()
    torch.manual_seed(4)
    ids = torch.randint(1, 50, (3, 6))
    image = torch.randn(3, 5, 24)
    full = decoder.logits(decoder(ids, torch.ones_like(ids), image))
    cache = decoder.start(image)
    stepped = torch.stack([cache(ids[:, t]) for t in range(ids.shape[1])], dim=1)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)


def test_post_norm_dropout_sits_where_bert_has_it():
    torch.manual_seed(0)
    layer = FusionLayer(16, 24, heads=2, mlp_ratio=4.0, dropout=0.1, norm="post")
    assert layer.output_dropout == 0.1 and layer.mlp[2].p == 0.0  # after output projections, not inside
    assert layer.self_attn.dropout == 0.1 and layer.cross_attn.dropout == 0.1  # attention probabilities
    pre = FusionLayer(16, 24, heads=2, mlp_ratio=4.0, dropout=0.1, norm="pre")
    assert pre.output_dropout == 0.0 and pre.mlp[2].p == 0.1  # pre-norm keeps its own placement


def test_fusion_config_refuses_bad_styles():
    with pytest.raises(ValueError, match="fusion.norm"):
        FusionConfig(norm="sandwich")
    with pytest.raises(ValueError, match="init_from_text_layers"):
        FusionConfig(depth=3, norm="post", init_from_text_layers=(6, 12))
    with pytest.raises(ValueError, match="needs fusion.norm=post"):
        FusionConfig(depth=6, init_from_text_layers=(6, 12))


def test_post_norm_merging_path_without_merges_equals_the_forward():
    """Token merging inside fusion calls each layer's `attend` then `feed_forward`: with nothing to merge,
    the post-norm stack gives its forward's output."""
    from vlp.platform.model.token_merging import TokenMergingConfig

    fusion = post_norm_stack(5)
    text, mask, image, _ = inputs(5)
    merged = fusion.merged_forward(text, mask, image, None, TokenMergingConfig(fusion_r=0, text_r=0))
    real = mask.bool()
    torch.testing.assert_close(merged[real], fusion(text, mask, image)[real], atol=1e-5, rtol=1e-5)
    with_merges = fusion.merged_forward(text, mask, image, None, TokenMergingConfig(fusion_r=2, text_r=1))
    assert with_merges.shape == text.shape and with_merges.isfinite().all()
