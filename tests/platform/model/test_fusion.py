"""The fusion stack's shortcuts equal its full forward: precomputed image keys and values, the [CLS] query
alone through the last layer, and a caption's first self-attention computed once."""

from __future__ import annotations

import pytest
import torch

from vlp.platform.model.fusion import FusionConfig, FusionEncoder


def stack_and_inputs(seed: int = 0):
    torch.manual_seed(seed)
    fusion = FusionEncoder(FusionConfig(depth=3, heads=2), dim=16, image_dim=24).eval()
    text = torch.randn(5, 7, 16)
    mask = torch.ones(5, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    image = torch.randn(5, 6, 24)
    bias = torch.randn(5, 6)
    return fusion, text, mask, image, bias


def test_precomputed_image_keys_and_values_equal_the_projection():
    fusion, text, mask, image, bias = stack_and_inputs()
    full = fusion(text, mask, image, image_bias=bias)
    cached = fusion(text, mask, None, image_bias=bias, image_kv=fusion.image_key_values(image))
    torch.testing.assert_close(cached, full, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_selected_positions_are_those_rows_of_the_full_output(causal):
    fusion, text, mask, image, bias = stack_and_inputs(1)
    full = fusion(text, mask, image, image_bias=bias, causal=causal)
    positions = torch.tensor([[0, 3], [2, 2], [6, 1], [0, 0], [5, 4]])
    some = fusion(text, mask, image, image_bias=bias, causal=causal, positions=positions)
    assert some.shape == (5, 2, 16)
    torch.testing.assert_close(
        some, full.gather(1, positions[..., None].expand(-1, -1, 16)), atol=1e-6, rtol=1e-6
    )


def test_shared_first_self_attention_equals_fusing_each_pair():
    fusion, text, mask, image, _ = stack_and_inputs(2)
    attended = fusion.first_self_attention(text, mask)
    texts, images = torch.tensor([0, 1, 1, 3, 4, 0]), torch.tensor([0, 1, 2, 2, 4, 3])
    kv = tuple((k[images], v[images]) for k, v in fusion.image_key_values(image))
    shared = fusion(attended[texts], mask[texts], None, image_kv=kv, self_attended=True)
    for row, (t, i) in enumerate(zip(texts.tolist(), images.tolist(), strict=True)):
        alone = fusion(text[t : t + 1], mask[t : t + 1], image[i : i + 1])
        torch.testing.assert_close(shared[row], alone[0], atol=1e-5, rtol=1e-5)
