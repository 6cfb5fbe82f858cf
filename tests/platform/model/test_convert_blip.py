"""`convert_blip` / `vlp convert blip` on checkpoints saved from LAVIS's BLIP models in each layout: the
retrieval model (no decoder, `idx_queue`) gives LAVIS's ITC similarities and ITM logits; the captioning model
(`visual_encoder` + `text_decoder` only) gives its LM logits, with the projections and temperature it lacks
listed as fresh; keys that fit nothing, a foreign vocabulary and an untied decoder are errors; the converted
file carries the architecture (`layout: blip`) that `init_from` builds a run from."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lavis_reference import (
    MINILM,
    bert_tokenizer,
    blip_caption,
    blip_pretrain,
    blip_retrieval,
    blip_tokenizer,
)

from vlp.platform.model.blip import BlipBackbone
from vlp.platform.model.convert_blip import convert_blip
from vlp.platform.model.decoder import shift_for_teacher_forcing
from vlp.platform.model.encoders import TextConfig, VisionConfig
from vlp.platform.model.fusion import FusionConfig

CAPTIONS = ["a red square left of a blue circle", "two dogs", "a small green triangle above a square"]
TOL = dict(atol=1e-5, rtol=1e-5)


def backbone(tokenizer, **changes) -> BlipBackbone:
    settings = dict(
        vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=2, heads=2),
        text=TextConfig(width=32, depth=0, heads=2, max_len=40, token_types=False),
        fusion=FusionConfig(depth=3, heads=2, norm="post", layer_norm_eps=1e-12),
        embed_dim=16,
        tokenizer=tokenizer,
        temperature="clamped",
    )
    return BlipBackbone(**(settings | changes)).eval()


def load_backbone(module: BlipBackbone, converted: dict) -> None:
    state = {k[len("backbone.") :]: v for k, v in converted.items() if k.startswith("backbone.")}
    missing, unexpected = module.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)


def inputs(tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    text = tokenizer(CAPTIONS, padding="longest", return_tensors="pt")
    return torch.randn(len(CAPTIONS), 3, 32, 32), text.input_ids, text.attention_mask


def test_retrieval_checkpoint_gives_lavis_itc_similarities_itm_logits_and_queues(one_thread):
    reference = blip_retrieval()
    tokenizer = bert_tokenizer()
    converted, fresh = convert_blip(reference.state_dict(), max_len=40, vocab_size=30524)
    momentum_free = {k: v for k, v in converted.items() if ".momentum." not in k}
    assert fresh == [] and not any(".decoder." in k for k in converted)
    model = backbone(tokenizer)
    load_backbone(model, momentum_free)
    images, ids, mask = inputs(tokenizer)
    with torch.no_grad():
        image_tokens = reference.visual_encoder.forward_features(images)
        image_feat = F.normalize(reference.vision_proj(image_tokens[:, 0]), dim=-1)
        text = reference.text_encoder(ids, attention_mask=mask, mode="text").last_hidden_state
        text_feat = F.normalize(reference.text_proj(text[:, 0]), dim=-1)
        image, features = model.encode_image(images), model.encode_text(ids, mask)
        torch.testing.assert_close(image.embedding @ features.embedding.T, image_feat @ text_feat.T, **TOL)
        encoder_ids = ids.clone()
        encoder_ids[:, 0] = blip_tokenizer().enc_token_id
        fused = reference.text_encoder(
            encoder_ids,
            attention_mask=mask,
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long),
        ).last_hidden_state
        head = torch.nn.Linear(32, 2)
        head.load_state_dict({k.split(".")[-1]: v for k, v in converted.items() if "itm.head" in k})
        ours = head(model.fuse(model.with_fusion_keys(image), features.tokens, mask)[:, 0])
        torch.testing.assert_close(ours, reference.itm_head(fused[:, 0]), **TOL)
    torch.testing.assert_close(converted["objectives.itc.queue.ids"], reference.idx_queue.reshape(-1))
    torch.testing.assert_close(converted["objectives.itc.queue.text"], reference.text_queue.T)


def test_captioning_checkpoint_gives_lavis_lm_logits_and_lists_what_starts_fresh(one_thread):
    reference = blip_caption()
    tokenizer = bert_tokenizer()
    converted, fresh = convert_blip(reference.state_dict(), max_len=40, embed_dim=16)
    projections = [f"backbone.{p}_proj.{k}" for p in ("text", "vision") for k in ("bias", "weight")]
    assert fresh == sorted([*projections, "backbone.temp"])
    # one self-attention per layer in the file (the decoder's): the encoder's starts as its copy
    torch.testing.assert_close(
        converted["backbone.fusion.layers.1.self_attn.query.weight"],
        converted["backbone.decoder.self_attns.1.query.weight"],
    )
    model = backbone(tokenizer, caption_decoder=True)
    load_backbone(model, converted)
    images, ids, mask = inputs(tokenizer, seed=1)
    with torch.no_grad():
        image_tokens = reference.visual_encoder.forward_features(images)
        decoder_ids = ids.clone()
        decoder_ids[:, 0] = blip_tokenizer().bos_token_id
        expected = reference.text_decoder(
            decoder_ids,
            attention_mask=mask,
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long),
        ).logits[:, :-1]
        shifted, shifted_mask, _ = shift_for_teacher_forcing(ids, mask)
        logits = model.decoder.logits(model.decode(model.encode_image(images), shifted, shifted_mask))
        real = shifted_mask.bool()
        torch.testing.assert_close(logits[real], expected[real], **TOL)


def test_keys_that_fit_nothing_a_foreign_vocabulary_and_an_untied_decoder_are_errors(one_thread):
    state = dict(blip_pretrain().state_dict())
    with pytest.raises(ValueError, match="30524 rows, the tokenizer 30522"):
        convert_blip(state, max_len=40, vocab_size=30522)
    extra = state | {
        "prompt_tokens": torch.zeros(3),
        "text_encoder.encoder.layer.0.adapter.weight": torch.zeros(3),
    }
    with pytest.raises(ValueError, match=r"fit nothing in vlp \(2\).*prompt_tokens"):
        convert_blip(extra, max_len=40)
    untied = dict(state)
    key = "text_decoder.bert.encoder.layer.1.crossattention.self.query.weight"
    untied[key] = untied[key] + 1
    with pytest.raises(ValueError, match="text_decoder.bert differs from text_encoder"):
        convert_blip(untied, max_len=40)
    without_decoder, _ = convert_blip(state, max_len=40, decoder=False)
    assert not any(".decoder." in k for k in without_decoder)
    assert without_decoder.keys() == {k for k in convert_blip(state, max_len=40)[0] if ".decoder." not in k}
    with pytest.raises(ValueError, match="neither text_encoder"):
        convert_blip({"visual_encoder.cls_token": torch.zeros(1, 1, 32)})


BLIP_CONFIG = """
seed_everything: 0
trainer: {accelerator: cpu, devices: 1, max_steps: 2, limit_val_batches: 1, num_sanity_val_steps: 0,
          enable_progress_bar: false, enable_model_summary: false, logger: false}
model:
  class_path: vlp.tasks.multitask.MultiTaskModule
  init_args:
    objectives:
      itc: {class_path: vlp.tasks.itc.ITCObjective, init_args: {alpha: 0.4, queue_size: 24}}
      itm: {class_path: vlp.tasks.itm.ITMObjective}
      caption: {class_path: vlp.tasks.caption.CaptionObjective, init_args: {label_smoothing: 0.1, max_length: 8}}
    mode: joint
data:
  sources:
    shapes:
      class_path: vlp.datamodules.shapes.ShapesSource
      init_args: {image_size: 32, num_train: 16, num_val: 8, num_test: 8, batch_size: 8, tokenizer: TOKENIZER}
  sampler:
    strategy: {class_path: vlp.platform.sampler.RoundRobin}
"""


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_vlp_convert_blip_file_carries_the_architecture_init_from_builds(tmp_path, suffix, capsys):
    from vlp.cli import main, run
    from vlp.platform.model.architecture import read_architecture

    official = tmp_path / "model_base.pth"
    torch.save({"model": blip_pretrain().state_dict()}, official)
    out = tmp_path / f"blip{suffix}"
    main(["convert", "blip", str(official), str(out), "--max-len", "40", "--vision-heads", "2",
          "--text-heads", "2"])  # fmt: skip
    assert str(out) in capsys.readouterr().out
    architecture = read_architecture(out)
    assert architecture["layout"] == "blip" and architecture["caption_decoder"]
    assert (architecture["text"]["depth"], architecture["fusion"]["depth"]) == (0, 3)
    config = tmp_path / "blip-objectives-only.yaml"
    config.write_text(BLIP_CONFIG.replace("TOKENIZER", str(MINILM)))
    cli = run(["fit", "--config", str(config), "--model.init_args.init_from", str(out),
               "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    assert isinstance(cli.model.backbone, BlipBackbone)
    assert cli.trainer.global_step == 2
    report = cli.model.init_report
    assert not report.fresh and not report.unused, (report.fresh, report.unused)
    assert cli.model.backbone.architecture == architecture
