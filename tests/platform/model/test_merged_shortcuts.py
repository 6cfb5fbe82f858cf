"""With token merging on (vision ToMe, text ToMe at the fusion's entry and inside it, text-guided image merging),
each shortcut of the fused pass gives what the pass computes without it, in values and gradients (float64,
1e-10): image keys and values computed once, only the read rows through the last layer (also behind text
merges), a caption's shared entry merge and first self-attention, packed real tokens, length groups."""

from __future__ import annotations

import pytest
import torch

import vlp.platform.model.length_buckets as buckets_module
import vlp.platform.model.packing as packing_module
from vlp.platform.model.fusion import FusionConfig
from vlp.platform.model.token_index import gather_tokens
from vlp.platform.model.token_merging import TokenMergingConfig

MERGINGS = {
    "vision": TokenMergingConfig(vision_r=4),
    "vision+text": TokenMergingConfig(vision_r=4, text_r=3),
    "text+fusion": TokenMergingConfig(text_r=4, fusion_r=3),
    "text, no proportional attention": TokenMergingConfig(vision_r=4, text_r=3, proportional_attention=False),
    "vision+text entry": TokenMergingConfig(vision_r=4, text_entry_r=4),
    "vision entry+text entry+text": TokenMergingConfig(vision_entry_r=6, text_entry_r=4, text_r=2),
    "text entry+text+fusion": TokenMergingConfig(text_entry_r=3, text_r=2, fusion_r=3),
    "text entry, no proportional attention": TokenMergingConfig(
        vision_r=4, text_entry_r=4, proportional_attention=False
    ),
}


@pytest.fixture
def wide_batch(shapes) -> dict:
    dataset = shapes.dataset("train")
    return shapes.collate([dataset[i] for i in range(48)])


def read_positions(mask: torch.Tensor) -> torch.Tensor:
    """[B, 3]: [CLS], the last real token and one in the middle (as MLM reads masked tokens)."""
    return torch.stack([torch.zeros_like(mask[:, 0]), mask.sum(1) - 1, mask.sum(1) // 2], dim=1)


def with_shortcuts(backbone, batch: dict) -> dict[str, torch.Tensor]:
    image = backbone.with_fusion_keys(backbone.encode_image(batch["image"]))
    text = backbone.encode_text(batch["input_ids"], batch["attention_mask"])
    mask = text.attention_mask
    positions = read_positions(mask)
    # ITM's way: each caption merged at the fusion's entry and self-attended once, fused with other images
    merged = backbone.merge_caption(text.tokens, mask)
    captions, caption_mask, sizes, pair_positions = text.tokens, mask, None, positions
    if merged is not None:
        captions, caption_mask, sizes = merged.tokens, merged.mask, merged.size[..., 0]
        merged_index = merged.unmerge(
            torch.arange(captions.shape[1]).double().expand(len(mask), -1)[..., None]
        )
        pair_positions = merged_index[..., 0].long().gather(1, positions)
    attended = backbone.first_self_attention(captions, caption_mask, sizes)
    rows = torch.arange(len(mask)).roll(1)
    return {
        "fused": backbone.fuse(image, text.tokens, mask),
        "positions": backbone.fuse(image, text.tokens, mask, positions=positions),
        "pairs": backbone.fuse(
            image.take(rows),
            attended,
            caption_mask,
            positions=pair_positions,
            self_attended=True,
            text_sizes=sizes,
        ),
    }


def without_shortcuts(backbone, batch: dict, monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """The whole padded batch in one group, keys and values and every row computed in each pass."""
    monkeypatch.setattr(buckets_module, "length_buckets", lambda mask, *a, **k: [(None, mask.shape[1])])
    monkeypatch.setattr(packing_module, "MIN_PADDING", 2.0)
    image = backbone.encode_image(batch["image"])
    text = backbone.encode_text(batch["input_ids"], batch["attention_mask"])
    mask = text.attention_mask
    rows = torch.arange(len(mask)).roll(1)
    fused = backbone.fuse(image, text.tokens, mask)
    return {
        "fused": fused,
        "positions": gather_tokens(fused, read_positions(mask)),
        "pairs": gather_tokens(backbone.fuse(image.take(rows), text.tokens, mask), read_positions(mask)),
    }


@pytest.mark.parametrize("merging", list(MERGINGS))
def test_merged_fusion_shortcuts_equal_the_full_pass_in_values_and_gradients(
    make_backbone, wide_batch, monkeypatch, one_thread, merging
):
    monkeypatch.setattr(buckets_module, "MIN_ROWS", 16)
    assert len(buckets_module.length_buckets(wide_batch["attention_mask"])) == 3
    assert packing_module.packing_for(wide_batch["attention_mask"]) is not None
    backbone = make_backbone(
        fusion=FusionConfig(depth=3, heads=2), caption_decoder=True, merging=MERGINGS[merging]
    ).double()
    batch = {**wide_batch, "image": wide_batch["image"].double()}
    real = batch["attention_mask"].bool()[..., None]
    ours = with_shortcuts(backbone, batch)
    with monkeypatch.context() as patch:
        whole = without_shortcuts(backbone, batch, patch)
    for key, want in whole.items():
        got = ours[key]
        if key == "fused":
            got, want = got * real, want * real
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10, msg=key)

    def gradients(outputs: dict[str, torch.Tensor]) -> tuple:
        weights = torch.Generator().manual_seed(0)
        loss = sum(
            ((out * real) if key == "fused" else out).mul(torch.randn(out.shape, generator=weights)).sum()
            for key, out in outputs.items()
        )
        return torch.autograd.grad(loss, list(backbone.parameters()), allow_unused=True)

    compared = 0
    for got, want in zip(gradients(ours), gradients(whole), strict=True):
        if want is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
            compared += 1
    assert compared > 20


def test_text_merging_leaves_the_last_layer_unmerged_so_its_rows_can_be_read_alone(make_backbone, batch):
    """Text merges happen after the attention of every fusion layer but the last: the output has as many
    distinct rows per caption as it has tokens entering the last layer."""
    backbone = make_backbone(fusion=FusionConfig(depth=2, heads=2), merging=TokenMergingConfig(text_r=3))
    with torch.no_grad():
        image = backbone.encode_image(batch["image"])
        text = backbone.encode_text(batch["input_ids"], batch["attention_mask"])
        fused = backbone.fuse(image, text.tokens, text.attention_mask)
    for row, length in zip(fused, text.attention_mask.sum(1).tolist(), strict=True):
        distinct = torch.unique(row[:length].round(decimals=5), dim=0)
        assert len(distinct) == length - min(3, (length - 1) // 2)  # one merge, in the first layer only
