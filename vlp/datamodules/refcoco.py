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

from vlp.datamodules.annotations import as_integer, as_number, field, read_json, text_field
from vlp.datamodules.captions import CaptionDataset, CaptionSource, split_files
from vlp.datamodules.images import (
    SkipSample,
    check_box,
    check_caption,
    decode_image,
    image_path,
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


def read_grounding(
    path: Path, image_root: Path, skipped: Counter, allow_absolute: bool = False
) -> list[GroundingRecord]:
    """Parse and check every entry; unusable ones are counted in `skipped` by reason, a field of the wrong
    type (an entry that is no object, a file name that is no text, a non-integer `image_id`, a width that is
    no number) is a ValueError naming file, entry and field."""
    data = read_json(path)
    entries = data.get("annotations") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list of entries or an object with 'annotations' (a list)")
    records, image_ids = [], {}
    for number, entry in enumerate(entries):
        where = f"entry {number}"
        key = "image" if isinstance(entry, dict) and "image" in entry else "file_name"
        if isinstance(entry, dict) and key not in entry:
            raise ValueError(f"{path}: {where} has no field 'image' (or 'file_name')")
        relative = text_field(entry, key, path, where)
        given_id = entry.get("image_id")
        if given_id is not None:
            given_id = as_integer(given_id, path, where, "image_id")
        raw_phrases = field(entry, "phrases", path, where)
        raw_phrases = [raw_phrases] if isinstance(raw_phrases, str) else raw_phrases
        if not isinstance(raw_phrases, list):
            raise ValueError(
                f"{path}: {where}: field 'phrases' must be a list or a string, got {raw_phrases!r}"
            )
        box = field(entry, "bbox", path, where)
        size = None
        if "width" in entry and "height" in entry:
            size = tuple(as_number(entry[side], path, where, side) for side in ("width", "height"))
        try:
            phrases = []
            for phrase in raw_phrases:
                try:
                    phrases.append(check_caption(phrase))
                except SkipSample as skip:
                    skipped[skip.reason] += 1
            if not phrases:
                continue
            file = image_path(image_root, relative, allow_absolute)
            if size is not None:
                if not file.is_file():
                    raise SkipSample("missing_file", str(file))
                width, height = size
            else:
                width, height = image_size(file)
            checked = check_box(box if isinstance(box, list | tuple) else [box], width, height)
        except SkipSample as skip:
            skipped[skip.reason] += 1
            continue
        image_id = given_id if given_id is not None else image_ids.setdefault(relative, len(image_ids))
        records.append(GroundingRecord(str(file), image_id, tuple(phrases), checked))
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
        if path is None:
            return None
        return read_grounding(path, self.image_root, self.skipped, self.allow_absolute_paths)
