"""`vlp data bootstrap`'s model from a converted BLIP checkpoint (`vlp convert blip` of LAVIS's `BlipPretrain`):
it is built as BLIP (`BlipBackbone`, from the stored layout), its match probabilities equal LAVIS's ITM head's
softmax on the same pairs, and its sampled captions are drawn through BLIP's decoder, the same for the same
generator."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lavis_reference import bert_tokenizer, blip_pretrain, blip_tokenizer

from vlp.cli.capfilt_model import CapFiltModel, SamplingSettings
from vlp.platform.model.blip import BlipBackbone

CAPTIONS = ["a red square left of a blue circle", "two dogs", "a small green triangle above a square"]


def test_a_converted_blip_checkpoint_scores_pairs_as_lavis_and_samples_captions(tmp_path, one_thread):
    from vlp.cli import main

    reference = blip_pretrain().eval()
    official = tmp_path / "model_base.pth"
    torch.save({"model": reference.state_dict()}, official)
    out = tmp_path / "blip.safetensors"
    main(["convert", "blip", str(official), str(out), "--max-len", "40", "--vision-heads", "2",
          "--text-heads", "2"])  # fmt: skip
    model = CapFiltModel.from_checkpoint(out, bert_tokenizer())
    assert isinstance(model.backbone, BlipBackbone)

    torch.manual_seed(0)
    images = torch.randn(3, 3, 32, 32)
    rows = torch.tensor([0, 1, 2, 1, 0])  # true pairs and swapped ones
    captions = [CAPTIONS[0], CAPTIONS[1], CAPTIONS[2], CAPTIONS[0], CAPTIONS[2]]
    with torch.no_grad():
        image = model.encode_images(images)
        probability = model.match_probability(image, rows, captions)
        text = blip_tokenizer()(
            captions, padding="longest", truncation=True, max_length=40, return_tensors="pt"
        )
        ids = text.input_ids.clone()
        ids[:, 0] = blip_tokenizer().enc_token_id
        image_tokens = reference.visual_encoder.forward_features(images)[rows]
        fused = reference.text_encoder(
            ids,
            attention_mask=text.attention_mask,
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long),
        ).last_hidden_state
        expected = F.softmax(reference.itm_head(fused[:, 0]), dim=-1)[:, 1]
    torch.testing.assert_close(probability, expected, atol=1e-5, rtol=1e-5)

    settings = SamplingSettings(top_p=0.9, top_k=50, temperature=1.0, repetition_penalty=1.1, min_length=3,
                                max_length=8)  # fmt: skip
    drawn = [model.sample_captions(image, 2, settings, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert drawn[0] == drawn[1] and len(drawn[0]) == 6 and all(drawn[0])
