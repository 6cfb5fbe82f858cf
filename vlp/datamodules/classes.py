"""Labelled images from files, for zero-shot classification: a folder per class or a CSV of (path, label).

Each split (`val`, `test`, optionally `train`) is either a directory with one sub-folder per class
(ImageNet / torchvision `ImageFolder` layout; "golden_retriever" names the class "golden retriever") or a
CSV/TSV file with an image-path column and a class-name column, paths relative to `image_root` (default:
the file's folder). Class names are the sorted union over the splits, or `classes` in the given order.
Batches are the caption batches of `CaptionSource` (the caption is the class name) plus `label` [B] and
`class_names`, what `vlp.tasks.zeroshot` reads. The text side must be the pre-training's vocabulary, so
`tokenizer` (a local folder) is required.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from vlp.datamodules.captions import SPLITS, CaptionRecord, CaptionSource, group_captions
from vlp.datamodules.csv import read_table
from vlp.datamodules.images import MAX_IMAGE_PIXELS
from vlp.datamodules.tokenizer import load_tokenizer

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def read_class_folders(root: Path, skipped: Counter) -> list[CaptionRecord]:
    """root/<class>/<image> -> records whose caption is the class name; other files are counted."""
    pairs = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        name = folder.name.replace("_", " ")
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    relative = str(path.relative_to(root))
                    pairs.append((relative, relative, name))
                else:
                    skipped["not_an_image_file"] += 1
    return group_captions(pairs, root, skipped)


class ImageClassesSource(CaptionSource):
    """Labelled images per split from class folders or a CSV (see the module docstring)."""

    def __init__(
        self,
        val: str | None = None,
        test: str | None = None,
        train: str | None = None,
        tokenizer: str | None = None,
        image_root: str | None = None,
        classes: list[str] | None = None,
        path_key: str = "filepath",
        label_key: str = "label",
        separator: str = ",",
        image_size: int = 224,
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        max_text_len: int = 40,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        if tokenizer is None:
            raise ValueError(
                "ImageClassesSource needs `tokenizer`: the local folder of the pre-training's vocabulary"
            )
        self.paths = {"train": train, "val": val, "test": test}
        if val is None and test is None:
            raise ValueError(
                "ImageClassesSource needs `val` or `test` (a class-folder directory or a CSV file)"
            )
        for split, path in self.paths.items():
            if path is not None and not Path(path).exists():
                raise FileNotFoundError(f"{split}: no such file or directory: {path}")
        self.image_root_override = image_root
        self.path_key, self.label_key, self.separator = path_key, label_key, separator
        no_augmentation = {"crop_scale": (1.0, 1.0), "flip": False}
        self.configure_loading(
            image_size,
            mean,
            std,
            **no_augmentation,
            max_text_len=max_text_len,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            max_pixels=MAX_IMAGE_PIXELS,
            background=(255, 255, 255),
        )
        self.records = {split: self.read(split) for split in SPLITS}
        found = sorted({r.captions[0] for records in self.records.values() if records for r in records})
        if not found:
            raise ValueError(f"ImageClassesSource: no usable images (skipped: {dict(self.skipped)})")
        self.class_names = list(classes) if classes else found
        unknown = sorted(set(found) - set(self.class_names))
        if unknown:
            raise ValueError(f"ImageClassesSource: labels {unknown} are not in `classes` {self.class_names}")
        self.tokenizer = load_tokenizer(tokenizer)

    def read(self, split: str) -> list[CaptionRecord] | None:
        path = self.paths[split]
        if path is None:
            return None
        path = Path(path)
        if path.is_dir():
            return read_class_folders(path, self.skipped)
        root = Path(self.image_root_override) if self.image_root_override else path.parent
        return read_table(path, root, self.path_key, self.label_key, self.separator, self.skipped)

    def collate(self, items: list[dict]) -> dict:
        batch = super().collate(items)
        batch["label"] = torch.tensor([self.class_names.index(item["caption"]) for item in items])
        batch["class_names"] = self.class_names
        return batch
