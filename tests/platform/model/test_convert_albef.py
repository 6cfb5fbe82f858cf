"""A converted ALBEF checkpoint gives in vlp what LAVIS's own code gives: image and text embeddings, ITC
similarities, ITM logits, MLM logits and the momentum model's features, to 1e-5, with and without packing
and the fused passes' shortcuts (image keys and values once, a caption's first self-attention shared, only
the read queries through the last layer). The "checkpoint" is LAVIS's `AlbefPretrain` with random weights
(non-trivial norms and biases, momentum copies apart from the online model) saved as the release files are.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from lavis_reference import (
    MINILM,
    albef_pretrain,
    albef_retrieval,
    bert_tokenizer,
    import_lavis_albef,
    official_checkpoint,
)

import vlp.platform.model.packing as packing_module
from vlp.cli.architecture import default_architecture
from vlp.platform.model.architecture import resolve_architecture
from vlp.platform.model.backbone import FusionBackbone, ImageFeatures, first_token
from vlp.platform.model.convert_albef import albef_architecture, convert_albef, resample_positions
from vlp.platform.model.encoders import TextConfig, VisionConfig
from vlp.platform.model.fusion import FusionConfig
from vlp.platform.model.momentum import MomentumConfig
from vlp.tasks.itc import ITCObjective
from vlp.tasks.itm import ITMObjective
from vlp.tasks.mlm import MLMObjective
from vlp.tasks.multitask import MultiTaskModule

CAPTIONS = [
    "a red square left of a blue circle",
    "two dogs",
    "a small green triangle above a large yellow square on grey",
    "the cat sleeps",
]
CONFIGS = Path(__file__).parents[3] / "configs"
TOL = dict(atol=1e-5, rtol=1e-5)


def vlp_albef(tokenizer, queue_size: int = 24, **sizes) -> MultiTaskModule:
    """vlp's ALBEF of the small reference size: post-norm fusion, clamped temperature, momentum, queue."""
    s = dict(image=32, patch=8, vision_width=32, vision_depth=2, vision_heads=2, width=32, text_depth=2)
    s |= dict(fusion_depth=2, heads=2, embed=16, max_len=40) | sizes
    backbone = FusionBackbone(
        vision=VisionConfig(
            image_size=s["image"],
            patch_size=s["patch"],
            width=s["vision_width"],
            depth=s["vision_depth"],
            heads=s["vision_heads"],
        ),
        text=TextConfig(width=s["width"], depth=s["text_depth"], heads=s["heads"], max_len=s["max_len"]),
        fusion=FusionConfig(depth=s["fusion_depth"], heads=s["heads"], norm="post", layer_norm_eps=1e-12),
        embed_dim=s["embed"],
        tokenizer=tokenizer,
        temperature="clamped",
        momentum=MomentumConfig(0.995),
    )
    objectives = {
        "itc": partial(ITCObjective, queue_size=queue_size, alpha=0.4),
        "itm": ITMObjective,
        "mlm": partial(MLMObjective, alpha=0.4),
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
    """(LAVIS AlbefPretrain, vlp module loaded from its converted release-format file, tokenizer)."""
    reference = albef_pretrain()
    with torch.no_grad():  # momentum copies apart from the online model, so a swap would show
        generator = torch.Generator().manual_seed(5)
        for _, momentum in reference.model_pairs:
            for p in momentum.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=generator))
        for name in ("text_encoder", "text_encoder_m"):  # the MLM heads are not in model_pairs
            head = getattr(reference, name).cls.predictions
            head.transform.dense.weight.add_(
                0.05 * torch.randn(head.transform.dense.weight.shape, generator=generator)
            )
    path = official_checkpoint(reference, tmp_path_factory.mktemp("albef") / "ALBEF.pth")
    tokenizer = bert_tokenizer()
    stored = torch.load(path, map_location="cpu", weights_only=True)
    module = vlp_albef(tokenizer)
    load_converted(module, convert_albef(stored, max_len=40, vocab_size=len(tokenizer)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only contend (conftest's one_thread)
    yield reference, module, tokenizer
    torch.set_num_threads(threads)


def batch(tokenizer, n: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    text = tokenizer(CAPTIONS[:n], padding="longest", return_tensors="pt")
    return torch.randn(n, 3, 32, 32), text.input_ids, text.attention_mask


@pytest.fixture(params=["padded", "packed"])
def packing(request, monkeypatch):
    monkeypatch.setattr(packing_module, "MIN_PADDING", 0.0 if request.param == "packed" else 2.0)
    return request.param


def test_unimodal_features_and_itc_similarities_equal_lavis(pair, packing):
    reference, module, tokenizer = pair
    backbone = module.backbone
    images, ids, mask = batch(tokenizer)
    with torch.no_grad():
        image_tokens = reference.visual_encoder.forward_features(images)
        image_feat = F.normalize(reference.vision_proj(image_tokens[:, 0]), dim=-1)
        text_tokens = reference.text_encoder.bert(ids, attention_mask=mask, mode="text").last_hidden_state
        text_feat = F.normalize(reference.text_proj(text_tokens[:, 0]), dim=-1)
        image, text = backbone.encode_image(images), backbone.encode_text(ids, mask)
        torch.testing.assert_close(image.tokens, image_tokens, **TOL)
        torch.testing.assert_close(image.embedding, image_feat, **TOL)
        real = mask.bool()
        torch.testing.assert_close(text.tokens[real], text_tokens[real], **TOL)
        torch.testing.assert_close(text.embedding, text_feat, **TOL)
        sims = backbone.logit_scale() * image.embedding @ text.embedding.T
        torch.testing.assert_close(sims, image_feat @ text_feat.T / reference.temp, **TOL)


@pytest.mark.parametrize("shortcuts", [False, True])
def test_itm_logits_equal_lavis(pair, packing, shortcuts):
    reference, module, tokenizer = pair
    backbone, head = module.backbone, module.objectives["itm"].head
    images, ids, mask = batch(tokenizer, seed=1)
    image_index = torch.tensor([0, 1, 2, 3, 0, 2, 3, 1])
    text_index = torch.tensor([0, 1, 2, 3, 2, 0, 1, 3])
    with torch.no_grad():
        image_tokens = reference.visual_encoder.forward_features(images)
        text_tokens = reference.text_encoder.bert(ids, attention_mask=mask, mode="text").last_hidden_state
        fused = reference.text_encoder.bert(
            encoder_embeds=text_tokens[text_index],
            attention_mask=mask[text_index],
            encoder_hidden_states=image_tokens[image_index],
            encoder_attention_mask=torch.ones(image_tokens[image_index].shape[:2], dtype=torch.long),
            mode="fusion",
        ).last_hidden_state
        expected = reference.itm_head(fused[:, 0])

        image, text = backbone.encode_image(images), backbone.encode_text(ids, mask)
        if shortcuts:  # keys and values once per image, each caption's first self-attention once, [CLS] only
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


def masked_ids(ids, mask, tokenizer, seed: int = 2):
    generator = torch.Generator().manual_seed(seed)
    selected = (torch.rand(ids.shape, generator=generator) < 0.3) & mask.bool()
    selected[:, 0] = False
    masked = ids.masked_fill(selected, tokenizer.mask_token_id)
    return masked, selected


@pytest.mark.parametrize("online", [True, False])
@pytest.mark.parametrize("shortcuts", [False, True])
def test_mlm_logits_equal_lavis_for_the_online_and_the_momentum_model(pair, packing, online, shortcuts):
    reference, module, tokenizer = pair
    images, ids, mask = batch(tokenizer, seed=3)
    masked, selected = masked_ids(ids, mask, tokenizer)
    mlm = module.objectives["mlm"]
    if online:
        backbone, head, encoder, vision = (
            module.backbone,
            mlm.head,
            reference.text_encoder,
            reference.visual_encoder,
        )
    else:
        backbone, head = module.backbone.momentum.backbone, mlm.momentum_head
        encoder, vision = reference.text_encoder_m, reference.visual_encoder_m
    with torch.no_grad():
        image_tokens = vision(images)
        expected = encoder(
            masked,
            attention_mask=mask,
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long),
            return_logits=True,
        )
        image = backbone.encode_image(images)
        torch.testing.assert_close(image.tokens, image_tokens, **TOL)
        text = backbone.text_tokens(masked, mask)
        weight = backbone.text.word_embeddings.weight
        if shortcuts:  # the selected positions alone through the last layer
            positions = selected.nonzero()
            rows = torch.zeros(len(ids), int(selected.sum(1).max()), dtype=torch.long)
            kept = torch.arange(rows.shape[1])[None, :] < selected.sum(1)[:, None]
            rows[kept] = positions[:, 1]
            fused = backbone.fuse(
                backbone.with_fusion_keys(image), text, mask, merge_text=False, positions=rows
            )
            logits = head(fused[kept]) @ weight.T + head.bias
            torch.testing.assert_close(logits, expected[selected], **TOL)
        else:  # every real position
            fused = backbone.fuse(image, text, mask, merge_text=False)
            logits = head(fused) @ weight.T + head.bias
            real = mask.bool()
            torch.testing.assert_close(logits[real], expected[real], **TOL)


def test_momentum_features_and_queues_equal_lavis(pair):
    reference, module, tokenizer = pair
    momentum = module.backbone.momentum.backbone
    images, ids, mask = batch(tokenizer, seed=4)
    with torch.no_grad():
        image_feat = F.normalize(reference.vision_proj_m(reference.visual_encoder_m(images)[:, 0]), dim=-1)
        text_tokens = reference.text_encoder_m.bert(ids, attention_mask=mask, mode="text").last_hidden_state
        text_feat = F.normalize(reference.text_proj_m(text_tokens[:, 0]), dim=-1)
        torch.testing.assert_close(momentum.encode_image(images).embedding, image_feat, **TOL)
        torch.testing.assert_close(momentum.encode_text(ids, mask).embedding, text_feat, **TOL)
        assert not torch.allclose(module.backbone.encode_image(images).embedding, image_feat, atol=1e-3)
    queue = module.objectives["itc"].queue
    image_q, text_q, queued_ids = queue.contents()
    torch.testing.assert_close(image_q, reference.image_queue.T)
    torch.testing.assert_close(text_q, reference.text_queue.T)
    assert int(queue.pointer) == int(reference.queue_ptr) and (queued_ids == -1).all()
    assert module.backbone.temp.item() == pytest.approx(reference.temp.item())


def test_position_table_is_resampled_as_lavis_does_for_fine_tuning(pair):
    reference, _, tokenizer = pair
    vit = import_lavis_albef()["vit"]
    table = reference.visual_encoder.pos_embed.detach()
    big = vit.VisionTransformerEncoder(img_size=48, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    expected = vit.interpolate_pos_embed(table, big)
    torch.testing.assert_close(resample_positions(table, 48, 8), expected)
    converted = convert_albef(reference.state_dict(), image_size=48, max_len=40, vocab_size=len(tokenizer))
    load_converted(vlp_albef(tokenizer, image=48), converted)


def test_keys_that_fit_nothing_and_a_foreign_vocabulary_are_errors(pair):
    reference, _, tokenizer = pair
    state = dict(reference.state_dict())
    with pytest.raises(ValueError, match="30522 rows, the tokenizer 30000"):
        convert_albef(state, max_len=40, vocab_size=30000)
    state["text_encoder.bert.encoder.layer.0.adapter.weight"] = torch.zeros(3)
    state["prompt_tokens"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"fit nothing in vlp \(2\).*prompt_tokens.*adapter"):
        convert_albef(state, max_len=40)
    with pytest.raises(ValueError, match="exceeds the checkpoint's 40 text positions"):
        convert_albef(reference.state_dict(), max_len=64)


def test_vlp_convert_albef_writes_what_init_from_loads(pair, tmp_path, capsys):
    from vlp.cli import main
    from vlp.platform.model.pretrained import load_pretrained, read_weights

    reference, module, tokenizer = pair
    official = official_checkpoint(reference, tmp_path / "ALBEF_4M.pth")
    out = tmp_path / "albef-vlp.safetensors"
    main(["convert", "albef", str(official), str(out), "--max-len", "40", "--vision-heads", "2",
          "--text-heads", "2"])  # fmt: skip
    assert str(out) in capsys.readouterr().out
    fresh = vlp_albef(tokenizer)
    report = load_pretrained(fresh, read_weights(out), out)
    assert not report.fresh and not report.unused
    assert any(k.startswith("objectives.itm.head") for k in report.loaded)
    expected = module.state_dict()
    for key, value in fresh.state_dict().items():
        if ".momentum." not in f".{key}" and "momentum_head" not in key:  # init_from syncs those
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)


ALBEF_CONFIG = """
seed_everything: 0
trainer: {accelerator: cpu, devices: 1, max_steps: 2, limit_val_batches: 1, num_sanity_val_steps: 0,
          enable_progress_bar: false, enable_model_summary: false, logger: false}
model:
  class_path: vlp.tasks.multitask.MultiTaskModule
  init_args:
    objectives:
      itc: {class_path: vlp.tasks.itc.ITCObjective,
            init_args: {alpha: 0.4, queue_size: 24, score_against: momentum}}
      itm: {class_path: vlp.tasks.itm.ITMObjective, init_args: {negatives: albef}}
      mlm: {class_path: vlp.tasks.mlm.MLMObjective, init_args: {alpha: 0.4, masking: albef}}
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
def test_the_converted_file_carries_the_architecture_init_from_builds(pair, tmp_path, suffix, capsys):
    """`vlp convert albef` stores the backbone's settings (read off the tensors, ALBEF's where tensors do
    not show them), so a config naming only objectives and data starts from the converted file."""
    from vlp.cli import main, run
    from vlp.platform.model.architecture import read_architecture

    reference, _, tokenizer = pair
    official = official_checkpoint(reference, tmp_path / "ALBEF.pth")
    out = tmp_path / f"albef-vlp{suffix}"
    main(["convert", "albef", str(official), str(out), "--max-len", "40", "--vision-heads", "2",
          "--text-heads", "2"])  # fmt: skip
    architecture = read_architecture(out)
    vision, text, fusion = architecture["vision"], architecture["text"], architecture["fusion"]
    assert (vision["image_size"], vision["patch_size"], vision["width"], vision["depth"]) == (32, 8, 32, 2)
    assert (text["width"], text["depth"], text["heads"], text["max_len"], text["token_types"]) == (
        32, 2, 2, 40, False
    )  # fmt: skip
    assert (fusion["depth"], fusion["heads"], fusion["norm"], fusion["layer_norm_eps"]) == (
        2,
        2,
        "post",
        1e-12,
    )
    assert architecture["embed_dim"] == 16 and architecture["momentum"] == {"decay": 0.995}
    assert architecture["temperature"] == "clamped"
    configs = dict(vision=VisionConfig(**vision), text=TextConfig(**text), fusion=FusionConfig(**fusion))
    rebuilt = FusionBackbone(**(architecture | configs), tokenizer=tokenizer)
    assert rebuilt.architecture == architecture  # every setting the backbone takes, and nothing else

    config = tmp_path / "albef-objectives-only.yaml"
    config.write_text(ALBEF_CONFIG.replace("TOKENIZER", str(MINILM)))
    cli = run(["fit", "--config", str(config), "--model.init_args.init_from", str(out),
               "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    assert cli.model.backbone.architecture == architecture
    assert cli.trainer.global_step == 2
    report = cli.model.init_report  # the backbone strictly, every head and the queue by name
    assert not report.fresh and not report.unused
    assert "objectives.itc.queue.image" in report.loaded and "objectives.itm.head.weight" in report.loaded
    with pytest.raises(ValueError, match=r"width 32 is not a multiple of 64: give the attention heads"):
        main(["convert", "albef", str(official), str(tmp_path / "x.pt"), "--max-len", "40"])


@pytest.mark.slow
def test_vit_b16_bert_base_albef_converts_exactly(monkeypatch, one_thread):
    """ALBEF's real sizes (ViT-B/16 at 224 + BERT-base 6 + 6, embed 256), two images: embeddings, ITC,
    ITM and MLM logits and the momentum features, through the packed shortcut passes."""
    monkeypatch.setattr(packing_module, "MIN_PADDING", 0.0)
    sizes = dict(image_size=224, patch_size=16, vision_width=768, vision_depth=12, vision_heads=12)
    sizes |= dict(text_width=768, text_layers=6, fusion_layers=6, text_heads=12, max_position=512)
    reference = albef_pretrain(embed_dim=256, queue_size=32, **sizes)
    tokenizer = bert_tokenizer()
    module = vlp_albef(
        tokenizer, queue_size=32, image=224, patch=16, vision_width=768, vision_depth=12, vision_heads=12,
        width=768, text_depth=6, fusion_depth=6, heads=12, embed=256, max_len=40,
    )  # fmt: skip
    converted = convert_albef(reference.state_dict(), max_len=40, vocab_size=len(tokenizer))
    load_converted(module, converted)
    stored = albef_architecture(converted)  # heads by default width / 64: 12 and 12
    built = module.backbone.architecture
    for tower, keys in {"vision": ("image_size", "patch_size", "width", "depth", "heads", "mlp_ratio"),
                        "text": ("width", "depth", "heads", "max_len", "mlp_ratio"),
                        "fusion": ("depth", "heads", "mlp_ratio", "norm", "layer_norm_eps")}.items():  # fmt: skip
        assert {k: stored[tower][k] for k in keys} == {k: built[tower][k] for k in keys}, tower
    assert stored["embed_dim"] == 256 and stored["vision"]["model"] == "vit_base_patch16_224"
    for config in ("pretrain/albef-4m.yaml", "finetune/albef-retrieval-coco.yaml"):  # their documented
        given = yaml.safe_load((CONFIGS / config).read_text())["model"]["init_args"]["backbone"]  # init_from
        defaults = default_architecture()
        resolve_architecture(stored, defaults | given["init_args"], defaults, config)  # agrees: no error
    backbone, tol = module.backbone, TOL
    torch.manual_seed(0)
    images = torch.randn(2, 3, 224, 224)
    text = tokenizer(CAPTIONS[1:3], padding="longest", return_tensors="pt")
    ids, mask = text.input_ids, text.attention_mask
    masked, selected = masked_ids(ids, mask, tokenizer)
    ones = torch.ones(2, 197, dtype=torch.long)
    with torch.no_grad():
        image_tokens = reference.visual_encoder.forward_features(images)
        image_feat = F.normalize(reference.vision_proj(image_tokens[:, 0]), dim=-1)
        text_tokens = reference.text_encoder.bert(ids, attention_mask=mask, mode="text").last_hidden_state
        text_feat = F.normalize(reference.text_proj(text_tokens[:, 0]), dim=-1)
        pairs = torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0])  # (image, text): two positives, one negative
        fused = reference.text_encoder.bert(
            encoder_embeds=text_tokens[pairs[1]],
            attention_mask=mask[pairs[1]],
            encoder_hidden_states=image_tokens[pairs[0]],
            encoder_attention_mask=torch.ones(3, 197, dtype=torch.long),
            mode="fusion",
        ).last_hidden_state
        itm = reference.itm_head(fused[:, 0])
        mlm = reference.text_encoder(
            masked, attention_mask=mask, encoder_hidden_states=image_tokens, encoder_attention_mask=ones,
            return_logits=True,
        )  # fmt: skip
        image_feat_m = F.normalize(reference.vision_proj_m(reference.visual_encoder_m(images)[:, 0]), dim=-1)

        image = backbone.with_fusion_keys(backbone.encode_image(images))
        text_features = backbone.encode_text(ids, mask)
        torch.testing.assert_close(image.embedding, image_feat, **tol)
        torch.testing.assert_close(text_features.embedding, text_feat, **tol)
        sims = backbone.logit_scale() * image.embedding @ text_features.embedding.T
        torch.testing.assert_close(sims, image_feat @ text_feat.T / reference.temp, **tol)
        attended = backbone.first_self_attention(text_features.tokens, mask)
        cls = first_token(3, mask.device)
        out = backbone.fuse(
            image.take(pairs[0]), attended[pairs[1]], mask[pairs[1]], positions=cls, self_attended=True
        )
        torch.testing.assert_close(module.objectives["itm"].head(out[:, 0]), itm, **tol)
        head = module.objectives["mlm"].head
        fused_masked = backbone.fuse(image, backbone.text_tokens(masked, mask), mask, merge_text=False)
        logits = head(fused_masked[selected]) @ backbone.text.word_embeddings.weight.T + head.bias
        torch.testing.assert_close(logits, mlm[selected], **tol)
        momentum = backbone.momentum.backbone.encode_image(images).embedding
        torch.testing.assert_close(momentum, image_feat_m, **tol)


def test_lavis_fine_tuned_retrieval_checkpoint_converts_exactly(packing):
    """LAVIS's fine-tuned retrieval format: `text_encoder.*` (a BertModel), no MLM head, `idx_queue`."""
    reference = albef_retrieval()
    tokenizer = bert_tokenizer()
    module = vlp_albef(tokenizer)
    converted = convert_albef(reference.state_dict(), max_len=40, vocab_size=len(tokenizer))
    assert not any(k.startswith("objectives.mlm.") for k in converted)
    module.load_state_dict(converted, strict=False)
    module.eval()
    backbone, head = module.backbone, module.objectives["itm"].head
    images, ids, mask = batch(tokenizer, seed=6)
    with torch.no_grad():
        image_tokens = reference.visual_encoder.forward_features(images)
        text_tokens = reference.text_encoder(ids, attention_mask=mask, mode="text").last_hidden_state
        fused = reference.text_encoder(
            encoder_embeds=text_tokens,
            attention_mask=mask,
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long),
            mode="fusion",
        ).last_hidden_state
        image, text = backbone.encode_image(images), backbone.encode_text(ids, mask)
        out = backbone.fuse(
            backbone.with_fusion_keys(image), text.tokens, mask, positions=first_token(4, mask.device)
        )
        torch.testing.assert_close(head(out[:, 0]), reference.itm_head(fused[:, 0]), **TOL)
        text_feat = F.normalize(
            reference.text_proj_m(
                reference.text_encoder_m(ids, attention_mask=mask, mode="text").last_hidden_state[:, 0]
            ),
            dim=-1,
        )
        torch.testing.assert_close(
            backbone.momentum.backbone.encode_text(ids, mask).embedding, text_feat, **TOL
        )
    assert torch.equal(module.objectives["itc"].queue.ids, reference.idx_queue.reshape(-1))
