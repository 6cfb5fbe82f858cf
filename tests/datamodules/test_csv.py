"""CSV/TSV caption tables: configurable columns and separator, captions grouped per image, bad rows counted."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlp.datamodules.csv import CsvCaptionsSource

from .conftest import write_jpeg


def test_tsv_with_open_clip_columns_groups_captions_and_skips_bad_rows(tmp_path: Path):
    for index in range(4):
        write_jpeg(tmp_path / "images" / f"{index}.jpg", seed=index)
    rows = [
        b"filepath\ttitle\n",
        b"0.jpg\ta red barn\n",
        b"1.jpg\ta boat\n",
        b"0.jpg\tthe barn again\n",
        b"2.jpg\t\xff\xfe broken bytes\n",
        b"3.jpg\t   \n",
        b"9.jpg\tno such image\n",
        "3.jpg\tcaf\u00e9 au lait\n".encode(),
    ]
    (tmp_path / "train.tsv").write_bytes(b"".join(rows))
    source = CsvCaptionsSource(str(tmp_path / "train.tsv"), str(tmp_path / "images"), image_size=32)
    records = source.records["train"]
    assert [(Path(r.path).name, r.captions) for r in records] == [
        ("0.jpg", ("a red barn", "the barn again")),
        ("1.jpg", ("a boat",)),
        ("3.jpg", ("caf\u00e9 au lait",)),
    ]
    assert [r.image_id for r in records] == [0, 1, 3]  # ids follow first appearance, unique per image
    assert dict(source.skipped) == {"bad_encoding": 1, "empty_caption": 1, "missing_file": 1}


def test_csv_with_img2dataset_columns_and_quoted_commas(tmp_path: Path):
    write_jpeg(tmp_path / "imgs" / "00000" / "000000001.jpg")
    (tmp_path / "pairs.csv").write_text(
        'url,caption,filepath\nhttp://x,"a cat, asleep",00000/000000001.jpg\n'
    )
    source = CsvCaptionsSource(
        str(tmp_path / "pairs.csv"),
        str(tmp_path / "imgs"),
        image_key="filepath",
        caption_key="caption",
        separator=",",
    )
    assert source.records["train"][0].captions == ("a cat, asleep",)
    assert source.dataset("train")[0]["caption"] == "a cat, asleep"


def test_a_missing_column_names_the_file_and_the_columns(tmp_path: Path):
    (tmp_path / "images").mkdir()
    (tmp_path / "bad.csv").write_text("path,text\nx.jpg,hello\n")
    with pytest.raises(ValueError, match=r"bad.csv: no column 'filepath' \(columns: \['path', 'text'\]\)"):
        CsvCaptionsSource(str(tmp_path / "bad.csv"), str(tmp_path / "images"), separator=",")
