"""Image paths are confined to the image root: a path that leaves it (`..`, an absolute path) is a counted
`outside_root` skip in every format, never read; `allow_absolute_paths` accepts absolute paths."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tests.datamodules.conftest import write_jpeg
from vlp.datamodules.captions import CocoCaptionsSource, read_coco, read_karpathy
from vlp.datamodules.csv import read_table
from vlp.datamodules.images import SkipSample, image_path
from vlp.datamodules.refcoco import read_grounding
from vlp.datamodules.vqa import read_vqa


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    """tmp/images/{a,b}.jpg, tmp/images/sub/c.jpg, and tmp/secret.jpg outside the root."""
    for name in ("images/a.jpg", "images/b.jpg", "images/sub/c.jpg", "secret.jpg", "images2/d.jpg"):
        write_jpeg(tmp_path / name, width=16, height=12)
    return tmp_path


INSIDE = ["a.jpg", "./b.jpg", "sub/c.jpg", "sub/../a.jpg", "sub//c.jpg", "sub/./../b.jpg"]
OUTSIDE = ["../secret.jpg", "sub/../../secret.jpg", "../images2/d.jpg", "..", "../images/../secret.jpg"]


@pytest.mark.parametrize("name", INSIDE)
def test_paths_inside_the_root_are_kept(layout, name):
    assert image_path(layout / "images", name) == layout / "images" / name


@pytest.mark.parametrize("name", OUTSIDE)
@pytest.mark.parametrize("allow_absolute", [False, True])
def test_paths_leaving_the_root_are_outside_root_even_with_absolute_paths_allowed(
    layout, name, allow_absolute
):
    with pytest.raises(SkipSample) as skip:
        image_path(layout / "images", name, allow_absolute)
    assert skip.value.reason == "outside_root"


def test_absolute_paths_need_the_option(layout):
    absolute = str(layout / "secret.jpg")
    with pytest.raises(SkipSample, match="outside_root: .*secret.jpg is absolute"):
        image_path(layout / "images", absolute)
    assert image_path(layout / "images", absolute, allow_absolute=True) == layout / "secret.jpg"
    with pytest.raises(SkipSample, match="outside_root"):  # even when it points inside the root
        image_path(layout / "images", str(layout / "images" / "a.jpg"))


def names_in(layout: Path, absolute: bool) -> list[str]:
    outside = [*OUTSIDE[:3], str(layout / "secret.jpg")]
    return ["a.jpg", *outside, "sub/c.jpg"] if not absolute else ["a.jpg", str(layout / "secret.jpg")]


def write_format(fmt: str, folder: Path, names: list[str]) -> Path:
    if fmt == "coco":
        data = {
            "images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
            "annotations": [{"image_id": i, "caption": f"cap {i}"} for i in range(len(names))],
        }
    elif fmt == "karpathy":
        data = {
            "images": [{"filename": n, "split": "train", "sentences": [{"raw": f"cap {n}"}]} for n in names]
        }
    elif fmt == "refcoco":
        data = [{"image": n, "phrases": ["thing"], "bbox": [1, 1, 4, 4]} for n in names]
    else:
        (folder / "train.tsv").write_text("filepath\ttitle\n" + "".join(f"{n}\tcap {n}\n" for n in names))
        return folder / "train.tsv"
    (folder / f"{fmt}.json").write_text(json.dumps(data))
    return folder / f"{fmt}.json"


def read(fmt: str, file: Path, root: Path, skipped: Counter, allow_absolute: bool) -> list:
    if fmt == "coco":
        return read_coco(file, root, skipped, allow_absolute)
    if fmt == "karpathy":
        return read_karpathy(json.loads(file.read_text()), file, root, "train", skipped, allow_absolute)
    if fmt == "refcoco":
        return read_grounding(file, root, skipped, allow_absolute)
    return read_table(file, root, "filepath", "title", "\t", skipped, allow_absolute)


@pytest.mark.parametrize("fmt", ["coco", "karpathy", "refcoco", "csv"])
@pytest.mark.parametrize("allow_absolute", [False, True])
def test_every_format_counts_paths_outside_the_root_and_keeps_the_rest(layout, fmt, allow_absolute):
    names = names_in(layout, absolute=False)
    file = write_format(fmt, layout, names)
    skipped: Counter = Counter()
    records = read(fmt, file, layout / "images", skipped, allow_absolute)
    kept = [Path(r.path) for r in records]
    expected = [layout / "images" / "a.jpg", layout / "images" / "sub" / "c.jpg"]
    if allow_absolute:
        expected.insert(1, layout / "secret.jpg")
    assert sorted(kept) == sorted(expected)
    assert dict(skipped) == {"outside_root": 3 + (not allow_absolute)}


def test_vqa_data_subtype_cannot_leave_the_root(layout):
    write_jpeg(layout / "COCO_.._000000000001.jpg", width=16, height=12)
    questions = layout / "q.json"
    questions.write_text(
        json.dumps({"data_subtype": "..", "questions": [{"question_id": 1, "image_id": 1, "question": "q?"}]})
    )
    skipped: Counter = Counter()
    assert (
        read_vqa(
            questions,
            None,
            layout / "images",
            "{data_subtype}/COCO_{data_subtype}_{image_id:012d}.jpg",
            skipped,
        )
        == []
    )
    assert skipped == {"outside_root": 1}


def test_the_source_option_reaches_the_reader(layout):
    file = write_format("coco", layout, names_in(layout, absolute=True))
    refused = CocoCaptionsSource(str(file), str(layout / "images"), tokenizer=None)
    assert [r.image_id for r in refused.records["train"]] == [0] and refused.skipped == {"outside_root": 1}
    allowed = CocoCaptionsSource(str(file), str(layout / "images"), allow_absolute_paths=True)
    assert [r.path for r in allowed.records["train"]] == [
        str(layout / "images" / "a.jpg"),
        str(layout / "secret.jpg"),
    ]
