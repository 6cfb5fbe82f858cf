"""Image-caption data from files: the COCO captions and Karpathy split readers, the dataset, the base source.

Every caption of an image is kept: a training visit draws one (a different one per epoch); evaluation
batches carry all of them (`references`, tokenized as `reference_*`) as the texts retrieval ranks and the
references BLEU/CIDEr score against, and the first as the image's caption for the per-pair losses.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from vlp.datamodules.images import (
    MAX_IMAGE_PIXELS,
    ImageTransform,
    SkipSample,
    check_caption,
    collate_skips,
    decode_image,
    first_usable,
    swap_left_right,
)
from vlp.datamodules.source import DataSource
from vlp.datamodules.tokenizer import build_corpus_tokenizer, load_tokenizer

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class CaptionRecord:
    """One image and every caption it has; `image_id` is unique within a split. `path` is the image file,
    or its encoded bytes for records read from litdata chunks."""

    path: str | bytes
    image_id: int
    captions: tuple[str, ...]


def read_json(path: str | Path) -> object:
    """Parse a JSON file; malformed JSON is a ValueError naming the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from error
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 at byte {error.start}") from error


def field(entry: object, key: str, path: str | Path, where: str) -> object:
    """`entry[key]`, or a ValueError naming the file, the entry and the missing field."""
    if not isinstance(entry, dict) or key not in entry:
        raise ValueError(f"{path}: {where} has no field {key!r}")
    return entry[key]


def group_captions(
    pairs: Sequence[tuple[str, object]], image_root: Path, skipped: Counter, ids: Sequence[int] | None = None
) -> list[CaptionRecord]:
    """(relative image path, caption) pairs -> one record per image, in first-seen order.

    Empty captions and images missing on disk are counted in `skipped` (per caption and per image).
    """
    captions: dict[str, list[str]] = {}
    image_ids: dict[str, int] = {}
    for number, (relative, caption) in enumerate(pairs):
        try:
            text = check_caption(caption)
        except SkipSample as skip:
            skipped[skip.reason] += 1
            continue
        captions.setdefault(relative, []).append(text)
        image_ids.setdefault(relative, len(image_ids) if ids is None else ids[number])
    records = []
    for relative, texts in captions.items():
        path = image_root / relative
        if not path.is_file():
            skipped["missing_file"] += 1
            continue
        records.append(CaptionRecord(str(path), image_ids[relative], tuple(texts)))
    return records


def read_coco(path: str | Path, image_root: Path, skipped: Counter) -> list[CaptionRecord]:
    """COCO captions JSON: `images` [{id, file_name}], `annotations` [{image_id, caption}]."""
    data = read_json(path)
    images = field(data, "images", path, "the top level")
    annotations = field(data, "annotations", path, "the top level")
    files = {}
    for number, image in enumerate(images):
        files[field(image, "id", path, f"images[{number}]")] = field(
            image, "file_name", path, f"images[{number}]"
        )
    pairs, ids = [], []
    for number, annotation in enumerate(annotations):
        image_id = field(annotation, "image_id", path, f"annotations[{number}]")
        caption = field(annotation, "caption", path, f"annotations[{number}]")
        if image_id not in files:
            skipped["unknown_image"] += 1
            continue
        pairs.append((files[image_id], caption))
        ids.append(int(image_id))
    return group_captions(pairs, image_root, skipped, ids)


def read_karpathy(
    data: object, path: str | Path, image_root: Path, split: str, skipped: Counter
) -> list[CaptionRecord]:
    """One split of a parsed Karpathy JSON (`images` [{filepath?, filename, split, sentences [{raw}]}]);
    `restval` counts as train. Image ids are the entry's `cocoid`/`imgid` when present, else its index."""
    pairs, ids = [], []
    for number, image in enumerate(field(data, "images", path, "the top level")):
        where = f"images[{number}]"
        image_split = field(image, "split", path, where)
        if (image_split if image_split != "restval" else "train") != split:
            continue
        relative = str(Path(image.get("filepath") or "") / field(image, "filename", path, where))
        image_id = int(image.get("cocoid", image.get("imgid", number)))
        for sentence in field(image, "sentences", path, where):
            pairs.append((relative, field(sentence, "raw", path, f"{where}.sentences")))
            ids.append(image_id)
    return group_captions(pairs, image_root, skipped, ids)


class CaptionDataset(Dataset):
    """Items: `image` [3, S, S], `image_id`, `caption`, `skipped` (reasons stepped over) and, for evaluation
    only, `references` (every caption of the image)."""

    def __init__(
        self,
        records: Sequence[CaptionRecord],
        transform: ImageTransform,
        train: bool,
        seed: int,
        name: str,
        max_pixels: int = MAX_IMAGE_PIXELS,
        background: tuple[int, int, int] = (255, 255, 255),
    ) -> None:
        self.records, self.transform, self.train, self.seed, self.name = records, transform, train, seed, name
        self.max_pixels, self.background = max_pixels, background
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Training draws another caption and another augmentation per epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def augmentation_generator(self, index: int) -> torch.Generator:
        """The random draws of sample `index` this epoch: the same in any worker, rank or resumed run."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index)

    def load(self, index: int) -> dict:
        record = self.records[index]
        image = decode_image(record.path, self.max_pixels, self.background)
        if not self.train:
            pixels, _, _ = self.transform(image)
            return {
                "image": pixels,
                "image_id": record.image_id,
                "caption": record.captions[0],
                "references": list(record.captions),
            }
        generator = self.augmentation_generator(index)
        pixels, _, flipped = self.transform(image, generator=generator)
        caption = record.captions[int(torch.randint(len(record.captions), (), generator=generator))]
        caption = swap_left_right(caption) if flipped else caption
        return {"image": pixels, "image_id": record.image_id, "caption": caption}

    def __getitem__(self, index: int) -> dict:
        return first_usable(self.load, index, len(self), self.name)


class CaptionSource(DataSource):
    """Base of the file-based caption sources: transforms, tokenizer, collate and the parse-time skips.

    Subclasses implement `read(split) -> list[CaptionRecord]` (None when the split has no annotations).
    `tokenizer` is a local tokenizer folder (e.g. a BERT `vocab.txt`); None builds a whole-word vocabulary
    from the training captions (words seen at least `min_word_count` times; offline, for small models).
    `mean`/`std`/`image_size` must match the vision tower (timm's `pretrained_cfg` for named models).
    """

    dataset_class: type[CaptionDataset] = CaptionDataset

    def __init__(
        self,
        image_root: str | None,
        image_size: int = 224,
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        crop_scale: tuple[float, float] = (0.5, 1.0),
        flip: bool = True,
        max_text_len: int = 40,
        tokenizer: str | None = None,
        min_word_count: int = 1,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        max_pixels: int = MAX_IMAGE_PIXELS,
        background: tuple[int, int, int] = (255, 255, 255),
    ) -> None:
        if image_root is None:
            raise ValueError("image_root is required (e.g. --data.image_root DIR)")
        self.image_root = Path(image_root)
        if not self.image_root.is_dir():
            raise FileNotFoundError(f"image_root is not a directory: {image_root}")
        self.configure_loading(
            image_size,
            mean,
            std,
            crop_scale,
            flip,
            max_text_len,
            batch_size,
            num_workers,
            seed,
            max_pixels,
            background,
        )
        self.records: dict[str, list[CaptionRecord] | None] = {}
        for split in SPLITS:
            self.records[split] = self.read(split)
        if not self.records["train"]:
            raise ValueError(
                f"{type(self).__name__}: no usable training samples (skipped: {dict(self.skipped)})"
            )
        self.tokenizer: PreTrainedTokenizerBase = (
            load_tokenizer(tokenizer)
            if tokenizer is not None
            else build_corpus_tokenizer(
                (c for r in self.records["train"] for c in r.captions), min_count=min_word_count
            )
        )

    def configure_loading(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        crop_scale: Sequence[float],
        flip: bool,
        max_text_len: int,
        batch_size: int,
        num_workers: int,
        seed: int,
        max_pixels: int,
        background: Sequence[int],
    ) -> None:
        """Check and keep the settings every file-based source shares (see the class docstring)."""
        if max_text_len < 3 or batch_size < 1 or num_workers < 0:
            raise ValueError(
                f"need max_text_len >= 3, batch_size >= 1, num_workers >= 0; got {max_text_len}, "
                f"{batch_size}, {num_workers}"
            )
        self.transform = ImageTransform(
            image_size, tuple(mean), tuple(std), tuple(crop_scale), flip_probability=0.5 if flip else 0.0
        )
        self.max_text_len, self.batch_size, self.num_workers = max_text_len, batch_size, num_workers
        self.seed, self.max_pixels, self.background = seed, max_pixels, tuple(background)
        self.skipped: Counter = Counter()  # entries dropped while reading the annotations, per reason

    def read(self, split: str) -> list[CaptionRecord] | None:
        raise NotImplementedError

    @property
    def total(self) -> int:
        """Samples read from the annotations, usable or not (the denominator of the bad fraction)."""
        return sum(len(r) for r in self.records.values() if r) + sum(self.skipped.values())

    def dataset(self, split: str) -> CaptionDataset:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        records = self.records[split]
        if not records:
            raise ValueError(f"{type(self).__name__} has no {split} annotations (or none usable)")
        return self.dataset_class(
            records,
            self.transform,
            split == "train",
            self.seed,
            f"{type(self).__name__}[{split}]",
            self.max_pixels,
            self.background,
        )

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L] ids and mask, [CLS] ... [SEP], truncated at `max_text_len` (never an error)."""
        encoded = self.tokenizer(
            texts, padding="longest", truncation=True, max_length=self.max_text_len, return_tensors="pt"
        )
        return encoded["input_ids"].long(), encoded["attention_mask"].long()

    def collate(self, items: list[dict]) -> dict:
        """Images [B, 3, S, S], captions [B, L]; with phrases also `phrase_*` [B, Lp] and `boxes` [B, 4];
        evaluation items add every caption: `references` and `reference_*` (see `DataSource`)."""
        input_ids, attention_mask = self.tokenize([item["caption"] for item in items])
        batch = {
            "image": torch.stack([item["image"] for item in items]),
            "image_id": torch.tensor([item["image_id"] for item in items], dtype=torch.long),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "captions": [item["caption"] for item in items],
            "skipped": collate_skips(items),
        }
        if "references" in items[0]:
            references = [item["references"] for item in items]
            batch["references"] = references
            batch["reference_input_ids"], batch["reference_attention_mask"] = self.tokenize(
                [text for texts in references for text in texts]
            )
            batch["reference_row"] = torch.repeat_interleave(
                torch.arange(len(items)), torch.tensor([len(texts) for texts in references])
            )
        if "phrase" in items[0]:
            batch["phrase_input_ids"], batch["phrase_attention_mask"] = self.tokenize(
                [item["phrase"] for item in items]
            )
            batch["phrases"] = [item["phrase"] for item in items]
            batch["boxes"] = torch.stack([item["box"] for item in items])
        return batch


def split_files(train: str | None, val: str | None, test: str | None) -> dict[str, Path | None]:
    """split -> annotation file, each checked to exist before training; train is required."""
    if train is None:
        raise ValueError("train_annotations is required (e.g. --data.train_annotations FILE)")
    return {
        "train": annotation_path(train, "train_annotations"),
        "val": annotation_path(val, "val_annotations"),
        "test": annotation_path(test, "test_annotations"),
    }


def annotation_path(path: str | None, name: str) -> Path | None:
    """A configured annotation file, checked before training: None stays None, a missing file fails."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise FileNotFoundError(f"{name}: no such file: {path}")
    return Path(path)


class CocoCaptionsSource(CaptionSource):
    """COCO captions JSON files per split (`captions_train2017.json` style), images under `image_root`."""

    def __init__(
        self,
        train_annotations: str | None = None,
        image_root: str | None = None,
        val_annotations: str | None = None,
        test_annotations: str | None = None,
        **kwargs,
    ) -> None:
        self.files = split_files(train_annotations, val_annotations, test_annotations)
        super().__init__(image_root, **kwargs)

    def read(self, split: str) -> list[CaptionRecord] | None:
        path = self.files[split]
        return None if path is None else read_coco(path, self.image_root, self.skipped)


class KarpathySource(CaptionSource):
    """One Karpathy split JSON (`dataset_coco.json`, `dataset_flickr30k.json`); `restval` trains."""

    def __init__(self, annotations: str | None = None, image_root: str | None = None, **kwargs) -> None:
        if annotations is None:
            raise ValueError("annotations is required (e.g. --data.annotations dataset_coco.json)")
        self.annotations = annotation_path(annotations, "annotations")
        self.data = read_json(self.annotations)
        super().__init__(image_root, **kwargs)

    def read(self, split: str) -> list[CaptionRecord] | None:
        return read_karpathy(self.data, self.annotations, self.image_root, split, self.skipped) or None
