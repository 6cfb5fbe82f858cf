"""The BLIP configs (pre-training, COCO captioning, COCO and Flickr30k retrieval) build and train a step: each
config's model and objectives as written, at a tiny size (the towers shrunk, no pretrained files, the shapes
data in place of COCO / the stream), so what the file names exists and fits together."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from lavis_reference import MINILM

from vlp.cli import run
from vlp.cli.architecture import default_architecture
from vlp.platform.model.architecture import resolve_architecture
from vlp.platform.model.blip import BlipBackbone
from vlp.platform.model.convert_blip import blip_architecture

CONFIGS = Path(__file__).parents[1] / "configs"
BLIP = ["pretrain/blip-base.yaml", "finetune/blip-caption-coco.yaml", "finetune/blip-retrieval-coco.yaml",
        "finetune/blip-retrieval-flickr.yaml"]  # fmt: skip
TINY = {
    "vision": {"model": None, "image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
    "text": {"width": 32, "heads": 2, "max_len": 40, "pretrained": None},
    "fusion": {"depth": 2, "heads": 2, "init_from_text_layers": None},
    "embed_dim": 16,
}


@pytest.mark.parametrize("name", BLIP)
def test_blip_config_builds_and_trains_a_step_at_a_tiny_size(name, tmp_path, one_thread):
    config = yaml.safe_load((CONFIGS / name).read_text())
    model = config["model"]["init_args"]
    backbone = model["backbone"]["init_args"]
    for key, value in TINY.items():
        backbone[key] = backbone[key] | value if isinstance(value, dict) else value
    for objective in model["objectives"].values():
        if "queue_size" in objective["init_args"]:
            objective["init_args"]["queue_size"] = 16
    config["trainer"] = {"accelerator": "cpu", "devices": 1, "max_steps": 1, "limit_val_batches": 0,
                         "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False,
                         "logger": False, "default_root_dir": str(tmp_path)}  # fmt: skip
    config["data"] = {
        "sources": {"shapes": {"class_path": "vlp.datamodules.shapes.ShapesSource", "init_args": {
            "image_size": 32, "num_train": 8, "num_val": 4, "num_test": 4, "batch_size": 4, "tokenizer": str(MINILM)
        }}},
        "sampler": {"strategy": {"class_path": "vlp.platform.sampler.RoundRobin"}},
    }  # fmt: skip
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = run(["fit", "--config", str(path)])
    assert isinstance(cli.model.backbone, BlipBackbone)
    assert cli.trainer.global_step == 1
    assert set(cli.model.objectives) == set(
        yaml.safe_load((CONFIGS / name).read_text())["model"]["init_args"]["objectives"]
    )


def converted_shapes(image_size: int, decoder: bool, momentum: bool) -> dict:
    """The tensors `blip_architecture` reads of a converted ViT-B/16 + BERT-base BLIP file (shapes only)."""
    meta = {"device": "meta"}
    state = {
        "backbone.vision.vit.patch_embed.proj.weight": torch.empty(768, 3, 16, 16, **meta),
        "backbone.vision.vit.pos_embed": torch.empty(1, 1 + (image_size // 16) ** 2, 768, **meta),
        "backbone.text.bert.embeddings.word_embeddings.weight": torch.empty(30524, 768, **meta),
        "backbone.text.bert.embeddings.position_embeddings.weight": torch.empty(512, 768, **meta),
        "backbone.vision_proj.weight": torch.empty(256, 768, **meta),
    }
    for i in range(12):
        state[f"backbone.vision.vit.blocks.{i}.mlp.fc1.weight"] = torch.empty(3072, 768, **meta)
        state[f"backbone.fusion.layers.{i}.mlp.0.weight"] = torch.empty(3072, 768, **meta)
    if decoder:
        state["backbone.decoder.bias"] = torch.empty(30524, **meta)
    if momentum:
        state["backbone.momentum.backbone.vision_proj.weight"] = torch.empty(256, 768, **meta)
    return state


@pytest.mark.parametrize(
    ("name", "image_size", "decoder", "momentum"),
    [("pretrain/blip-base.yaml", 224, True, True), ("finetune/blip-caption-coco.yaml", 384, True, False),
     ("finetune/blip-retrieval-coco.yaml", 384, False, True), ("finetune/blip-retrieval-flickr.yaml", 384, False, True)],
)  # fmt: skip
def test_blip_configs_agree_with_the_converted_checkpoints_they_start_from(
    name, image_size, decoder, momentum
):
    """The architecture `vlp convert blip` stores for the checkpoint a config names (model_base.pth at 224;
    captioning and retrieval files, or model_base.pth converted at 384) resolves against the config's backbone:
    `init_from` builds it without a contradiction."""
    stored = blip_architecture(converted_shapes(image_size, decoder, momentum))
    assert stored.pop("layout") == "blip"
    given = yaml.safe_load((CONFIGS / name).read_text())["model"]["init_args"]["backbone"]["init_args"]
    defaults = default_architecture()
    settings, _ = resolve_architecture(stored, defaults | given, defaults, name)
    assert settings["fusion"]["depth"] == 12 and settings["text"]["depth"] == 0
