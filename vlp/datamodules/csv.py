"""CSV/TSV image-caption tables (img2dataset / open_clip `csv_img_key`, `csv_caption_key` convention)."""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from vlp.datamodules.captions import CaptionRecord, CaptionSource, group_captions, split_files

# A caption or path longer than this is refused by the csv module (its default limit is 128 KiB); captions
# are cut to `max_text_len` tokens later anyway, so a long field only has to be read, not kept whole.
MAX_FIELD_CHARS = 2**31 - 1


def read_table(
    path: Path,
    image_root: Path,
    image_key: str,
    caption_key: str,
    separator: str,
    skipped: Counter,
    allow_absolute: bool = False,
) -> list[CaptionRecord]:
    """Rows (header first) -> one record per image path; repeated paths collect their captions.

    Rows are read strictly: a quote that is never closed, or a quoted field followed by more text, is a
    ValueError naming the file and line (a lenient reader would swallow the following rows into one
    caption), and so is a field that spans lines, a duplicate header column or a missing one. A row with
    another number of fields than the header is skipped and counted (`malformed_row`); a row with bytes
    that are not UTF-8 too (`bad_encoding`), the rest of the file still reads. Blank lines are no rows.
    """
    text = path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    csv.field_size_limit(max(csv.field_size_limit(), MAX_FIELD_CHARS))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=separator, strict=True)
    rows = iter_rows(reader, path)
    header = next(rows, (1, None))[1]
    if header is None:
        raise ValueError(f"{path}: empty file (no header row)")
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise ValueError(f"{path}: line 1: header repeats column(s) {repeated} (columns: {header})")
    for key in (image_key, caption_key):
        if key not in header:
            raise ValueError(f"{path}: no column {key!r} (columns: {header})")
    image_column, caption_column = header.index(image_key), header.index(caption_key)
    entries = []
    for line, row in rows:
        if not row:
            continue
        if len(row) != len(header):
            skipped["malformed_row"] += 1
            continue
        for column, value in enumerate(row):
            if "\n" in value or "\r" in value:
                raise ValueError(
                    f"{path}: line {line}: field {header[column]!r} spans several lines "
                    "(a quote never closed?); captions and paths hold no line breaks"
                )
        values = (row[image_column], row[caption_column])
        if any(_has_undecodable(v) for v in values):
            skipped["bad_encoding"] += 1
            continue
        entries.append((values[0], values[0], values[1]))
    return group_captions(entries, image_root, skipped, allow_absolute=allow_absolute)


def iter_rows(reader: Iterator[list[str]], path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line where the row starts, fields); a csv.Error is a ValueError naming file and line."""
    line = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            raise ValueError(
                f"{path}: line {line}: {error} (a quote never closed, or text after a closing quote?)"
            ) from None
        yield line, row
        line = reader.line_num + 1


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
            path,
            self.image_root,
            self.image_key,
            self.caption_key,
            self.separator,
            self.skipped,
            self.allow_absolute_paths,
        )
