"""CSV/TSV image-caption tables (img2dataset / open_clip `csv_img_key`, `csv_caption_key` convention)."""

from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path

from vlp.datamodules.captions import CaptionRecord, CaptionSource, group_captions, split_files


def read_table(
    path: Path, image_root: Path, image_key: str, caption_key: str, separator: str, skipped: Counter
) -> list[CaptionRecord]:
    """Rows (header first) -> one record per image path; repeated paths collect their captions.

    The file is decoded row by row: a row with bytes that are not UTF-8 is counted (`bad_encoding`) and
    skipped, the rest of the file still reads. A missing column is a ValueError naming file and column.
    """
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text.removeprefix("\ufeff"), newline=""), delimiter=separator)
    for key in (image_key, caption_key):
        if key not in (reader.fieldnames or []):
            raise ValueError(f"{path}: no column {key!r} (columns: {reader.fieldnames})")
    pairs = []
    for row in reader:
        values = (row[image_key] or "", row[caption_key])
        if any(isinstance(v, str) and _has_undecodable(v) for v in values):
            skipped["bad_encoding"] += 1
            continue
        pairs.append(values)
    return group_captions(pairs, image_root, skipped)


def _has_undecodable(text: str) -> bool:
    return any("\udc80" <= char <= "\udcff" for char in text)


class CsvCaptionsSource(CaptionSource):
    """One table per split with an image-path column and a caption column, paths relative to `image_root`.

    `separator` is "," for CSV or "\\t" for TSV; `image_key` / `caption_key` name the columns
    (img2dataset writes `filepath`/`url` and `caption`; open_clip's defaults are `filepath` and `title`).
    """

    def __init__(
        self,
        train_annotations: str | None = None,
        image_root: str | None = None,
        val_annotations: str | None = None,
        test_annotations: str | None = None,
        image_key: str = "filepath",
        caption_key: str = "title",
        separator: str = "\t",
        **kwargs,
    ) -> None:
        self.files = split_files(train_annotations, val_annotations, test_annotations)
        self.image_key, self.caption_key, self.separator = image_key, caption_key, separator
        super().__init__(image_root, **kwargs)

    def read(self, split: str) -> list[CaptionRecord] | None:
        path = self.files[split]
        if path is None:
            return None
        return read_table(
            path, self.image_root, self.image_key, self.caption_key, self.separator, self.skipped
        )
