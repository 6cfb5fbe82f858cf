"""COCO captions and Karpathy split files: every caption kept, bad entries counted, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlp.datamodules.captions import CocoCaptionsSource, KarpathySource
from vlp.datamodules.multitask import MultiTaskDataModule

from .conftest import write_coco, write_jpeg


def coco(folder: Path, **kwargs) -> CocoCaptionsSource:
    options = {"image_size": 32, "batch_size": 4, **kwargs}
    return CocoCaptionsSource(
        str(folder / "captions_train.json"),
        str(folder / "images"),
        val_annotations=str(folder / "captions_val.json"),
        **options,
    )


def test_coco_keeps_every_caption_and_draws_one_per_visit(coco_folder: Path):
    source = coco(coco_folder)
    train, val = source.dataset("train"), source.dataset("val")
    assert len(train) == 24 and len(val) == 8 and not source.skipped
    item = val[1]
    assert item["image_id"] == 1001 and item["caption"] == "picture 1 on the left"
    assert item["references"] == ["picture 1 on the left", "another view 1", "a third caption for 1"]
    assert item["image"].shape == (3, 32, 32) and item["skipped"] == []
    drawn = set()
    for epoch in range(12):
        train.set_epoch(epoch)
        caption = train[3]["caption"]
        drawn.add(caption.replace("right", "left"))  # a flipped visit says "right"
    assert drawn == {"picture 3 on the left", "another view 3", "a third caption for 3"}
    train.set_epoch(5)
    torch.testing.assert_close(train[3]["image"], train[3]["image"])  # same (seed, epoch, index), same crop


def test_collate_tokenizes_with_truncation_and_sums_the_skips(coco_folder: Path):
    source = coco(coco_folder, max_text_len=5)
    dataset = source.dataset("val")
    batch = source.collate([dataset[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 32, 32) and batch["input_ids"].shape == (4, 5)
    assert batch["image_id"].tolist() == [1000, 1001, 1002, 1003]
    assert (batch["input_ids"][:, 0] == source.tokenizer.cls_token_id).all()
    assert (batch["input_ids"][:, -1] == source.tokenizer.sep_token_id).all()  # truncated, still closed
    assert source.tokenizer.unk_token_id not in batch["input_ids"]
    assert batch["skipped"] == {}


def test_evaluation_batches_carry_every_caption_tokenized_and_training_batches_none(coco_folder: Path):
    source = coco(coco_folder)
    val = source.dataset("val")
    batch = source.collate([val[i] for i in range(3)])  # 2, 3 and 2 captions
    captions = [c for refs in batch["references"] for c in refs]
    assert len(captions) == 7 and batch["reference_row"].tolist() == [0, 0, 1, 1, 1, 2, 2]
    ids, mask = source.tokenize(captions)
    assert torch.equal(batch["reference_input_ids"], ids) and torch.equal(
        batch["reference_attention_mask"], mask
    )
    train = source.dataset("train")
    train_batch = source.collate([train[i] for i in range(3)])
    assert not {"references", "reference_input_ids", "reference_row"} & set(train_batch)


def test_coco_counts_bad_annotations_and_steps_over_bad_files(coco_folder: Path):
    images = {
        1: "train2017/000001.jpg",
        2: "gone.jpg",
        3: "empty.jpg",
        4: "trunc.jpg",
        5: "train2017/000005.jpg",
    }
    root = coco_folder / "images"
    (root / "empty.jpg").write_bytes(b"")
    full = (root / "train2017/000004.jpg").read_bytes()
    (root / "trunc.jpg").write_bytes(full[: len(full) // 2])
    captions = [(1, "a cat"), (1, "  "), (2, "a missing file"), (3, "empty"), (4, "truncated")]
    captions += [(5, "a dog"), (99, "an unknown image")]
    write_coco(coco_folder / "captions_train.json", images, captions)
    source = coco(coco_folder)
    assert dict(source.skipped) == {"empty_caption": 1, "missing_file": 1, "unknown_image": 1}
    dataset = source.dataset("train")
    assert [r.image_id for r in dataset.records] == [1, 3, 4, 5]
    items = [dataset[i] for i in range(4)]
    assert [item["image_id"] for item in items] == [1, 5, 5, 5]
    assert source.collate(items)["skipped"] == {"empty_file": 1, "truncated_image": 2}  # 1 steps over 2


def test_a_data_module_stops_past_max_bad_fraction_with_the_counts(coco_folder: Path):
    images = {i: f"train2017/{i:06d}.jpg" for i in range(24)}
    write_coco(coco_folder / "captions_train.json", images, [(i, "ok" if i else " ") for i in range(24)])
    source = coco(coco_folder)
    assert source.total == 23 + 8 + 1  # image 0 had only the empty caption
    # 1 of 32 is bad, but the fraction is judged once 100 samples were read
    module = MultiTaskDataModule({"coco": source}, max_bad_fraction=0.005)
    module.samples_read = 100  # as after 68 loaded samples without another bad one
    with pytest.raises(
        RuntimeError, match=r"max_bad_fraction=0.005.*skipped 1 of 100 samples read \(empty_caption: 1\)"
    ):
        module.check_bad_fraction()


def test_the_data_module_counts_what_the_loader_stepped_over(coco_folder: Path):
    (coco_folder / "images/train2017/000002.jpg").write_bytes(b"not a jpeg")
    module = MultiTaskDataModule({"coco": coco(coco_folder)}, max_bad_fraction=0.5)
    source = module.sources["coco"]
    dataset = source.dataset("train")
    batch = source.collate([dataset[i] for i in range(4)])
    module.on_before_batch_transfer(batch, 0)
    assert "skipped" not in batch and module.skipped == {} and module.loader_skipped == {"not_an_image": 1}
    module.sync_skipped()  # the run's totals (one process: this rank's)
    assert module.skipped == {"not_an_image": 1}
    assert module.samples_read == 32 + 5  # 32 records, then 4 items + 1 stepped over
    assert module.skipped_summary() == "skipped 1 of 37 samples read (not_an_image: 1)"


def test_configuration_errors_name_the_file_before_training(coco_folder: Path):
    with pytest.raises(FileNotFoundError, match="val_annotations: no such file: .*nope.json"):
        CocoCaptionsSource(
            str(coco_folder / "captions_train.json"), str(coco_folder / "images"), val_annotations="nope.json"
        )
    with pytest.raises(FileNotFoundError, match="image_root is not a directory: .*missing"):
        CocoCaptionsSource(str(coco_folder / "captions_train.json"), str(coco_folder / "missing"))
    (coco_folder / "broken.json").write_text('{"images": [\n  {"id": 1,, "file_name": "a.jpg"}\n]}')
    with pytest.raises(ValueError, match=r"broken.json: malformed JSON at line 2, column 12"):
        CocoCaptionsSource(str(coco_folder / "broken.json"), str(coco_folder / "images"))
    (coco_folder / "fields.json").write_text('{"images": [{"id": 1}], "annotations": []}')
    with pytest.raises(ValueError, match=r"fields.json: images\[0\] \(id 1\) has no field 'file_name'"):
        CocoCaptionsSource(str(coco_folder / "fields.json"), str(coco_folder / "images"))
    with pytest.raises(ValueError, match="no val annotations"):
        CocoCaptionsSource(str(coco_folder / "captions_train.json"), str(coco_folder / "images")).dataset(
            "val"
        )


def test_karpathy_splits_with_restval_training(tmp_path: Path):
    entries = []
    for index, split in enumerate(["train", "restval", "val", "test", "train", "val"]):
        write_jpeg(tmp_path / "images" / "folder" / f"{index}.jpg", seed=index)
        sentences = [{"raw": f"image {index} caption {k}"} for k in range(5)]
        if index == 4:
            sentences[2]["raw"] = ""
        entries.append(
            {
                "filepath": "folder",
                "filename": f"{index}.jpg",
                "split": split,
                "cocoid": 500 + index,
                "sentences": sentences,
            }
        )
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))
    source = KarpathySource(
        str(tmp_path / "dataset_coco.json"), str(tmp_path / "images"), image_size=32, batch_size=2
    )
    records = source.records
    assert [r.image_id for r in records["train"]] == [500, 501, 504]
    assert [r.image_id for r in records["val"]] == [502, 505] and [r.image_id for r in records["test"]] == [
        503
    ]
    assert records["train"][2].captions == tuple(f"image 4 caption {k}" for k in (0, 1, 3, 4))
    assert dict(source.skipped) == {"empty_caption": 1}
    assert source.dataset("test")[0]["references"] == [f"image 3 caption {k}" for k in range(5)]
