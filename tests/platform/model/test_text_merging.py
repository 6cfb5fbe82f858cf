"""PuMer's text-guided merging of image tokens in the fusion (vlp/platform/model/text_merging.py)."""

import pytest
import torch

from vlp.platform.model.text_merging import text_guided_merge

# --- text-guided (PuMer) merging ----------------------------------------------------------------------


def test_text_guided_merge_merges_the_least_attended_tokens_first():
    image = torch.randn(1, 6, 4)
    attention = torch.tensor([0.3, 0.2, 0.01, 0.25, 0.2, 0.02]).expand(1, 2, 3, 6)  # [B, H, Nt, Ni]
    merged, size = text_guided_merge(image, attention, r=2)
    assert merged.shape == (1, 4, 4) and size.sum() == 6
    kept = [0, 1, 3, 4]
    singles = size[0, :, 0] == 1
    torch.testing.assert_close(merged[0][singles], image[0, kept][singles])


def test_text_guided_merge_ignores_padded_text_and_averages_into_most_similar():
    image = torch.eye(4)[None]
    image[0, 3] = torch.tensor([0.0, 0.9, 0.1, 0.0])  # token 3 is closest to token 1
    real_row = torch.tensor([0.4, 0.3, 0.25, 0.05])
    pad_row = torch.tensor([0.0, 0.0, 0.0, 1.0])  # padding attends only to token 3
    attention = torch.stack([real_row, pad_row])[None]  # [B, Nt, Ni]
    merged, size = text_guided_merge(image, attention, r=1, text_mask=torch.tensor([[1, 0]]))
    assert torch.equal(size[0, :, 0], torch.tensor([1.0, 2.0, 1.0]))
    torch.testing.assert_close(merged[0, 1], (image[0, 1] + image[0, 3]) / 2)


def test_text_guided_merge_protects_first_token_when_asked_and_rejects_bad_shapes():
    image = torch.randn(2, 5, 4)
    attention = torch.zeros(2, 3, 5)  # [CLS] least attended of all, yet protected
    attention[..., 1:] = 1.0
    merged, size = text_guided_merge(image, attention, r=10, protect_first=True)
    assert (
        merged.shape == (2, 2, 4)
        and torch.equal(merged[:, 0], image[:, 0])
        and torch.equal(size[:, 0, 0], torch.ones(2))
    )
    with pytest.raises(ValueError, match="cross_attn_weights"):
        text_guided_merge(image, torch.zeros(2, 3, 4), r=1)
    with pytest.raises(ValueError, match="text_mask"):
        text_guided_merge(image, attention, r=1, text_mask=torch.ones(2, 4))
