"""Grounding JSON (RefCOCO style): boxes checked against the image, moved by the transforms, phrases kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlp.datamodules.captions import CocoCaptionsSource
from vlp.datamodules.multitask import MultiTaskDataModule, SourceStream
from vlp.datamodules.refcoco import RefCocoSource
from vlp.datamodules.tokenizer import build_corpus_tokenizer

from .conftest import write_jpeg


def entry(image: str, box, phrases=("the thing on the left",), **extra) -> dict:
    return {"image": image, "phrases": list(phrases), "bbox": box, **extra}


def test_refcoco_checks_boxes_and_returns_normalised_boxes(tmp_path: Path):
    write_jpeg(tmp_path / "images" / "a.jpg", width=80, height=40)
    write_jpeg(tmp_path / "images" / "b.jpg", width=60, height=60)
    entries = [
        entry("a.jpg", [20, 10, 40, 20], ["the middle block", "centre thing"]),
        entry("b.jpg", [0, 0, 30, 60], ["the left half"], width=60, height=60),
        entry("a.jpg", [70, 10, 40, 20]),  # outside
        entry("a.jpg", [10, 10, 0, 20]),  # zero area
        entry("a.jpg", [-5, 10, 10, 20]),  # negative
        {"file_name": "a.jpg", "phrases": ["nan box"], "bbox": [float("nan"), 1, 2, 3]},
        entry("a.jpg", [10, 10, 10, 10], ["", "  "]),  # no usable phrase
        entry("gone.jpg", [1, 1, 2, 2]),
    ]
    (tmp_path / "train.json").write_text(json.dumps(entries))
    (tmp_path / "val.json").write_text(json.dumps({"annotations": entries[:2]}))
    source = RefCocoSource(
        str(tmp_path / "train.json"),
        str(tmp_path / "images"),
        val_annotations=str(tmp_path / "val.json"),
        image_size=32,
    )
    assert dict(source.skipped) == {
        "box_outside_image": 1,
        "box_zero_area": 1,
        "box_negative": 1,
        "box_not_finite": 1,
        "empty_caption": 2,
        "missing_file": 1,
    }
    val = source.dataset("val")
    batch = source.collate([val[0], val[1]])
    torch.testing.assert_close(batch["boxes"], torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.25, 0.5, 0.5, 1.0]]))
    assert batch["phrases"] == ["the middle block", "the left half"] and batch["captions"] == batch["phrases"]
    assert batch["phrase_input_ids"].shape[0] == 2 and batch["references"][0] == [
        "the middle block",
        "centre thing",
    ]
    assert batch["image_id"].tolist() == [0, 1]


def test_a_training_flip_mirrors_the_box_and_swaps_the_phrase(tmp_path: Path):
    write_jpeg(tmp_path / "images" / "a.jpg", width=64, height=64)
    (tmp_path / "train.json").write_text(
        json.dumps([entry("a.jpg", [0, 16, 16, 32], ["the block on the left"])])
    )
    source = RefCocoSource(
        str(tmp_path / "train.json"), str(tmp_path / "images"), image_size=32, crop_scale=(1.0, 1.0)
    )
    dataset = source.dataset("train")
    seen = set()
    for epoch in range(8):
        dataset.set_epoch(epoch)
        item = dataset[0]
        left_side = float(item["box"][0]) < 0.5
        assert item["phrase"] == ("the block on the left" if left_side else "the block on the right")
        seen.add(left_side)
    assert seen == {True, False}


def test_captions_and_grounding_sources_mix_under_one_vocabulary(tmp_path: Path, coco_folder: Path):
    for index in range(8):
        write_jpeg(tmp_path / "refs" / f"{index}.jpg", width=48, height=48, seed=index)
    entries = [
        entry(f"{index}.jpg", [4, 4, 20, 20], [f"the block on the left of picture {index}"])
        for index in range(8)
    ]
    (tmp_path / "refs.json").write_text(json.dumps(entries))
    vocabulary = tmp_path / "vocab"
    build_corpus_tokenizer(["picture another view the block on left of a third caption for"]).save_pretrained(
        vocabulary
    )
    coco = CocoCaptionsSource(
        str(coco_folder / "captions_train.json"),
        str(coco_folder / "images"),
        image_size=32,
        batch_size=4,
        tokenizer=str(vocabulary),
    )
    refs = RefCocoSource(
        str(tmp_path / "refs.json"),
        str(tmp_path / "refs"),
        image_size=32,
        batch_size=4,
        tokenizer=str(vocabulary),
    )
    module = MultiTaskDataModule(
        {"coco": coco, "refcoco": refs}, tasks={"itc": "coco", "grounding": "refcoco"}
    )
    assert module.resolve_tasks(["itc", "grounding"]) == {"itc": "coco", "grounding": "refcoco"}
    grounding = SourceStream("refcoco", refs, seed=0).next()
    assert grounding["boxes"].shape == (4, 4) and grounding["phrase_input_ids"].shape[0] == 4
    assert "boxes" not in SourceStream("coco", coco, seed=0).next()
    with pytest.raises(ValueError, match="use different vocabularies"):
        MultiTaskDataModule(
            {
                "coco": CocoCaptionsSource(
                    str(coco_folder / "captions_train.json"), str(coco_folder / "images")
                ),
                "refcoco": refs,
            }
        )
