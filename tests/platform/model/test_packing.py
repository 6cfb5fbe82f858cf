"""Running the text tower, fusion and the caption decoder on the packed real tokens gives the same tokens and
gradients at the real positions as running the padded batch."""

from __future__ import annotations

import pytest
import torch
from padded_passes import PER_POSITION, assert_equal_to_padded
from transformers import BertConfig, BertModel
from transformers.models.bert.modeling_bert import BertLayer

import vlp.platform.model.packing as packing_module
from vlp.platform.model.encoders import PackedBertLayer, switch_to_packed_layers
from vlp.platform.model.fusion import FusionConfig
from vlp.platform.model.packing import Packing, packing_for
from vlp.platform.model.token_index import gather_tokens


def padded(monkeypatch) -> None:
    """Every pass runs the padded batch (no batch has enough padding to pack)."""
    monkeypatch.setattr(packing_module, "MIN_PADDING", 2.0)


def test_pack_unpack_and_take_follow_the_mask():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    x = torch.arange(12.0).view(3, 4, 1).expand(3, 4, 2)
    packing = Packing(mask)
    packed = packing.pack(x)
    assert packed[:, 0].tolist() == [0, 1, 2, 4, 8, 9, 10, 11]  # row-major, padding left out
    back = packing.unpack(packed)
    assert back.shape == (3, 4, 2)
    torch.testing.assert_close(back, x * mask[..., None])  # zeros at the padding
    positions = torch.tensor([[0, 2], [0, 0], [3, 1]])
    torch.testing.assert_close(packing.take(packed, positions), gather_tokens(x, positions))


def test_only_batches_with_enough_padding_are_packed(batch):
    assert packing_for(torch.ones(4, 9, dtype=torch.long)) is None
    nearly_full = torch.ones(4, 25, dtype=torch.long)
    nearly_full[0, -1] = 0  # 1 % padding
    assert packing_for(nearly_full) is None
    # the shapes captions (as the default's) are packed: the tests below compare two different paths
    packing = packing_for(batch["attention_mask"])
    assert packing is not None and packing.tokens == int(batch["attention_mask"].sum())


@pytest.mark.parametrize("depth", [1, 2])
def test_packed_passes_equal_the_padded_batch_in_values_and_gradients(
    make_backbone, batch, monkeypatch, one_thread, depth
):
    backbone = make_backbone(caption_decoder=True, fusion=FusionConfig(depth=depth, heads=2))
    assert backbone.text.packs
    outputs = assert_equal_to_padded(backbone, batch, monkeypatch, padded)
    real = batch["attention_mask"].bool()[..., None]
    for key in PER_POSITION:
        assert not outputs[key].masked_select(~real).any(), key  # zeros at the padding


def test_only_plain_bert_encoders_switch_to_packed_layers():
    small = {"vocab_size": 20, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}
    plain = BertModel(BertConfig(**small, intermediate_size=16), add_pooling_layer=False)
    assert switch_to_packed_layers(plain) and type(plain.encoder.layer[0]) is PackedBertLayer
    chunked = BertModel(BertConfig(**small, chunk_size_feed_forward=1), add_pooling_layer=False)
    assert not switch_to_packed_layers(chunked) and type(chunked.encoder.layer[0]) is BertLayer
    keys = set(BertModel(BertConfig(**small, intermediate_size=16), add_pooling_layer=False).state_dict())
    assert set(plain.state_dict()) == keys  # same parameters and names: checkpoints load either way
