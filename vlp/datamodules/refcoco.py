"""Referring-expression grounding data in the RefCOCO style: an image, its referring phrases, one box.

Annotation file (one per split): a JSON list, or an object with `annotations`, of entries
`{"image": "<path under image_root>", "phrases": ["the man on the left", ...], "bbox": [x, y, w, h]}`
(pixels; `file_name` is accepted for `image`, optional `width`/`height` spare reading the image header,
optional `image_id`). Boxes go through the same crop/flip as the image and come out as `boxes`
[B, 4] normalised (cx, cy, w, h), the keys the grounding objective reads.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from vlp.datamodules.captions import CaptionDataset, CaptionSource, field, read_json, split_files
from vlp.datamodules.images import (
    SkipSample,
    check_box,
    check_caption,
    decode_image,
    image_size,
    swap_left_right,
)


@dataclass(frozen=True)
class GroundingRecord:
    path: str | bytes  # the image file, or its encoded bytes (litdata chunks)
    image_id: int
    phrases: tuple[str, ...]
    box: tuple[float, float, float, float]  # pixels x, y, w, h, checked against the image

    @property
    def captions(self) -> tuple[str, ...]:
        return self.phrases


def read_grounding(path: Path, image_root: Path, skipped: Counter) -> list[GroundingRecord]:
    """Parse and check every entry; unusable ones are counted in `skipped` by reason."""
    data = read_json(path)
    entries = data.get("annotations") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list of entries or an object with 'annotations'")
    records, image_ids = [], {}
    for number, entry in enumerate(entries):
        where = f"entry {number}"
        relative = entry.get("image", entry.get("file_name")) if isinstance(entry, dict) else None
        if relative is None:
            raise ValueError(f"{path}: {where} has no field 'image' (or 'file_name')")
        raw_phrases = field(entry, "phrases", path, where)
        raw_phrases = [raw_phrases] if isinstance(raw_phrases, str) else raw_phrases
        box = field(entry, "bbox", path, where)
        image_path = image_root / relative
        try:
            phrases = []
            for phrase in raw_phrases:
                try:
                    phrases.append(check_caption(phrase))
                except SkipSample as skip:
                    skipped[skip.reason] += 1
            if not phrases:
                continue
            if "width" in entry and "height" in entry:
                if not image_path.is_file():
                    raise SkipSample("missing_file", str(image_path))
                width, height = int(entry["width"]), int(entry["height"])
            else:
                width, height = image_size(image_path)
            checked = check_box(box if isinstance(box, list | tuple) else [box], width, height)
        except SkipSample as skip:
            skipped[skip.reason] += 1
            continue
        image_id = int(entry.get("image_id", image_ids.setdefault(str(relative), len(image_ids))))
        records.append(GroundingRecord(str(image_path), image_id, tuple(phrases), checked))
    return records


class GroundingDataset(CaptionDataset):
    """Items: `image`, `image_id`, `phrase` (also `caption`), `box` [4]; for evaluation also `references`
    (all phrases)."""

    def load(self, index: int) -> dict:
        record: GroundingRecord = self.records[index]
        image = decode_image(record.path, self.max_pixels, self.background)
        check_box(record.box, *image.size)  # the annotation's width/height may not be the file's
        if not self.train:
            pixels, box, _ = self.transform(image, record.box)
            phrase = record.phrases[0]
            evaluation = {"references": list(record.phrases)}
        else:
            generator = self.augmentation_generator(index)
            pixels, box, flipped = self.transform(image, record.box, generator)
            phrase = record.phrases[int(torch.randint(len(record.phrases), (), generator=generator))]
            phrase = swap_left_right(phrase) if flipped else phrase
            evaluation = {}
        return {
            "image": pixels,
            "image_id": record.image_id,
            "caption": phrase,
            "phrase": phrase,
            "box": box,
            **evaluation,
        }


class RefCocoSource(CaptionSource):
    """Grounding JSON files per split, images under `image_root`; the phrases also serve as captions.

    Other arguments as `CaptionSource` (transforms, tokenizer, batch size, ...). Training crops always keep
    the whole box; a flip swaps "left"/"right" in the phrase.
    """

    dataset_class = GroundingDataset

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

    def read(self, split: str) -> list[GroundingRecord] | None:
        path = self.files[split]
        return None if path is None else read_grounding(path, self.image_root, self.skipped)
