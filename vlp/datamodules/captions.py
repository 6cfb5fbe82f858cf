"""Image-caption data from files: the COCO captions and Karpathy split readers, the dataset, the base source.

Every caption of an image is kept: a training visit draws one (a different one per epoch); evaluation
batches carry all of them (`references`, tokenized as `reference_*`) as the texts retrieval ranks and the
references BLEU/CIDEr score against, and the first as the image's caption for the per-pair losses.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from vlp.datamodules.annotations import (
    UniqueIds,
    as_text,
    field,
    integer_field,
    list_field,
    read_json,
    text_field,
)
from vlp.datamodules.images import (
    MAX_IMAGE_PIXELS,
    ImageTransform,
    SkipSample,
    check_caption,
    collate_skips,
    decode_image,
    first_usable,
    image_path,
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


def group_captions(
    entries: Sequence[tuple[Hashable, object, object]],
    image_root: Path,
    skipped: Counter,
    ids: Mapping[Hashable, int] | None = None,
    allow_absolute: bool = False,
) -> list[CaptionRecord]:
    """(image key, image path as written, caption) triples -> one record per key, in first-seen order.

    The key is the image id where the format has one, else the path. `ids` maps keys to image ids (default:
    the first-seen order). Unusable captions are counted in `skipped` per caption, unusable images
    (missing, outside the image root, an unencodable path) per image: see `vlp.datamodules.images`.
    """
    captions: dict[Hashable, list[str]] = {}
    names: dict[Hashable, object] = {}
    for key, name, caption in entries:
        try:
            text = check_caption(caption)
        except SkipSample as skip:
            skipped[skip.reason] += 1
            continue
        captions.setdefault(key, []).append(text)
        names.setdefault(key, name)
    records = []
    for number, (key, texts) in enumerate(captions.items()):
        try:
            path = image_path(image_root, str(names[key]), allow_absolute)
            if not path.is_file():
                raise SkipSample("missing_file", str(path))
        except SkipSample as skip:
            skipped[skip.reason] += 1
            continue
        records.append(CaptionRecord(str(path), number if ids is None else ids[key], tuple(texts)))
    return records


def read_coco(
    path: str | Path, image_root: Path, skipped: Counter, allow_absolute: bool = False
) -> list[CaptionRecord]:
    """COCO captions JSON: `images` [{id, file_name}], `annotations` [{image_id, caption}].

    Ids must be integers and unique, file names non-empty strings (else a ValueError naming file, record
    and field); a caption of an unknown image is counted (`unknown_image`)."""
    data = read_json(path)
    images = list_field(data, "images", path, "the top level")
    annotations = list_field(data, "annotations", path, "the top level")
    files: dict[int, str] = {}
    unique = UniqueIds(path, "id")
    for number, image in enumerate(images):
        where = f"images[{number}]"
        image_id = integer_field(image, "id", path, where)
        files[image_id] = text_field(image, "file_name", path, f"{where} (id {image_id})")
        unique.add(image_id, where)
    entries = []
    for number, annotation in enumerate(annotations):
        where = f"annotations[{number}]"
        image_id = integer_field(annotation, "image_id", path, where)
        caption = field(annotation, "caption", path, where)
        if image_id not in files:
            skipped["unknown_image"] += 1
            continue
        entries.append((image_id, files[image_id], caption))
    return group_captions(entries, image_root, skipped, {i: i for i in files}, allow_absolute)


def read_karpathy(
    data: object,
    path: str | Path,
    image_root: Path,
    split: str,
    skipped: Counter,
    allow_absolute: bool = False,
) -> list[CaptionRecord]:
    """One split of a parsed Karpathy JSON (`images` [{filepath?, filename, split, sentences [{raw}]}]);
    `restval` counts as train. Image ids are the entry's `cocoid`/`imgid` when present, else its index;
    they must be integers, unique within the split."""
    entries, ids = [], {}
    unique = UniqueIds(path, "image id")
    for number, image in enumerate(list_field(data, "images", path, "the top level")):
        where = f"images[{number}]"
        image_split = text_field(image, "split", path, where)
        if (image_split if image_split != "restval" else "train") != split:
            continue
        id_key = "cocoid" if "cocoid" in image else "imgid" if "imgid" in image else None
        image_id = number if id_key is None else integer_field(image, id_key, path, where)
        where = f"{where} (id {image_id})"
        unique.add(image_id, where)
        folder = image.get("filepath")
        if folder is not None and not isinstance(folder, str):
            as_text(folder, path, where, "filepath")
        name = text_field(image, "filename", path, where)
        relative = str(Path(folder or "") / name)
        ids[number] = image_id
        for index, sentence in enumerate(list_field(image, "sentences", path, where)):
            entries.append((number, relative, field(sentence, "raw", path, f"{where}.sentences[{index}]")))
    return group_captions(entries, image_root, skipped, ids, allow_absolute)


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
    Image paths must lie under `image_root` (else counted as `outside_root`); `allow_absolute_paths`
    accepts absolute paths in the annotations as they are.
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
        allow_absolute_paths: bool = False,
    ) -> None:
        if image_root is None:
            raise ValueError("image_root is required (e.g. --data.image_root DIR)")
        self.image_root = Path(image_root)
        if not self.image_root.is_dir():
            raise FileNotFoundError(f"image_root is not a directory: {image_root}")
        self.allow_absolute_paths = allow_absolute_paths
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
        if path is None:
            return None
        return read_coco(path, self.image_root, self.skipped, self.allow_absolute_paths)


class KarpathySource(CaptionSource):
    """One Karpathy split JSON (`dataset_coco.json`, `dataset_flickr30k.json`); `restval` trains."""

    def __init__(self, annotations: str | None = None, image_root: str | None = None, **kwargs) -> None:
        if annotations is None:
            raise ValueError("annotations is required (e.g. --data.annotations dataset_coco.json)")
        self.annotations = annotation_path(annotations, "annotations")
        self.data = read_json(self.annotations)
        super().__init__(image_root, **kwargs)

    def read(self, split: str) -> list[CaptionRecord] | None:
        return (
            read_karpathy(
                self.data, self.annotations, self.image_root, split, self.skipped, self.allow_absolute_paths
            )
            or None
        )
