"""Malformed annotation files, every supported format: a field of the wrong type, a duplicate id or a broken
table row is an error naming the file, the record and the field; what a sample's content gets wrong is a
counted skip of its own reason, and the records kept are exactly the good ones."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tests.datamodules.conftest import write_jpeg
from vlp.datamodules.captions import read_coco, read_karpathy
from vlp.datamodules.csv import read_table
from vlp.datamodules.refcoco import read_grounding
from vlp.datamodules.vqa import read_vqa

GOOD = {1: "a.jpg", 2: "b.jpg", 3: "c.jpg"}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for name in (*GOOD.values(), "COCO_x_000000000001.jpg", "COCO_x_000000000002.jpg"):
        write_jpeg(tmp_path / "images" / name, width=16, height=12)
    return tmp_path / "images"


def coco(images: list | dict | None = None, annotations: list | None = None) -> dict:
    images = [{"id": i, "file_name": f} for i, f in GOOD.items()] if images is None else images
    annotations = (
        [{"image_id": i, "caption": f"cap {i}"} for i in GOOD] if annotations is None else annotations
    )
    return {"images": images, "annotations": annotations}


def with_image(index: int, **fields: object) -> dict:
    data = coco()
    data["images"][index] = {**data["images"][index], **fields}
    for key, value in fields.items():
        if value is ...:
            del data["images"][index][key]
    return data


def karpathy(index: int = 1, **fields: object) -> dict:
    images = [
        {"filename": f, "split": "train", "cocoid": i, "sentences": [{"raw": f"cap {i}"}]}
        for i, f in GOOD.items()
    ]
    images[index].update(fields)
    return {"images": images}


def grounding(index: int = 1, **fields: object) -> list:
    entries = [{"image": f, "phrases": [f"thing {i}"], "bbox": [1, 1, 4, 4]} for i, f in GOOD.items()]
    entries[index] = {**entries[index], **fields} if isinstance(entries[index], dict) else entries[index]
    return entries


def vqa_questions(index: int = 1, **fields: object) -> dict:
    questions = [{"question_id": q, "image_id": 1 + q % 2, "question": f"q {q}?"} for q in (10, 11, 12)]
    questions[index].update(fields)
    return {"data_subtype": "x", "questions": questions}


def vqa_annotations(index: int = 1, **fields: object) -> dict:
    entries = [{"question_id": q, "answers": [{"answer": "yes"}]} for q in (10, 11, 12)]
    entries[index].update(fields)
    return {"annotations": entries}


JSON_ERRORS = [
    # (format, content, the record, the field / what is wrong)
    *[
        ("coco", with_image(1, id=bad), "images[1]", "field 'id' must be an integer")
        for bad in ("abc", [2], None, 1.5, True, {}, "2.0", float("nan"))
    ],
    *[
        (
            "coco",
            with_image(1, file_name=bad),
            "images[1] (id 2)",
            "field 'file_name' must be a non-empty string",
        )
        for bad in (None, 7, "", "  ", ["b.jpg"])
    ],
    ("coco", with_image(1, file_name=...), "images[1] (id 2)", "has no field 'file_name'"),
    ("coco", with_image(2, id=1), "images[2]", "id 1 repeats the id of images[0]"),
    ("coco", with_image(2, id=1.0), "images[2]", "id 1 repeats the id of images[0]"),
    ("coco", with_image(2, id="01"), "images[2]", "id 1 repeats the id of images[0]"),
    ("coco", coco(images={"1": {"id": 1, "file_name": "a.jpg"}}), "the top level", "'images' must be a list"),
    ("coco", coco(annotations="none"), "the top level", "'annotations' must be a list"),
    ("coco", coco(images=[["a.jpg", 1]]), "images[0]", "must be an object with field 'id', got a list"),
    *[
        (
            "coco",
            coco(annotations=[{"image_id": 1, "caption": "x"}, {"image_id": bad, "caption": "y"}]),
            "annotations[1]",
            "field 'image_id' must be an integer",
        )
        for bad in ("one", None, 2.5, [1])
    ],
    ("coco", coco(annotations=[{"caption": "x"}]), "annotations[0]", "has no field 'image_id'"),
    *[
        ("karpathy", karpathy(cocoid=bad), "images[1]", "field 'cocoid' must be an integer")
        for bad in ("x", 2.5, None)
    ],
    (
        "karpathy",
        karpathy(cocoid=1),
        "images[1] (id 1)",
        "image id 1 repeats the image id of images[0] (id 1)",
    ),
    ("karpathy", karpathy(filename=None), "images[1] (id 2)", "field 'filename' must be a non-empty string"),
    ("karpathy", karpathy(filepath=5), "images[1] (id 2)", "field 'filepath' must be a non-empty string"),
    ("karpathy", karpathy(split=["train"]), "images[1]", "field 'split' must be a non-empty string"),
    ("karpathy", karpathy(sentences="cap"), "images[1] (id 2)", "field 'sentences' must be a list"),
    ("karpathy", karpathy(sentences=[{"text": "x"}]), "images[1] (id 2).sentences[0]", "has no field 'raw'"),
    *[
        ("refcoco", grounding(image=bad), "entry 1", "field 'image' must be a non-empty string")
        for bad in (None, 3, "")
    ],
    *[
        ("refcoco", grounding(image_id=bad), "entry 1", "field 'image_id' must be an integer")
        for bad in ("x", 1.5)
    ],
    ("refcoco", grounding(width="wide", height=10), "entry 1", "field 'width' must be a finite number"),
    ("refcoco", grounding(phrases=5), "entry 1", "field 'phrases' must be a list or a string"),
    ("refcoco", ["a.jpg"], "entry 0", "must be an object with field 'file_name', got a string"),
    (
        "vqa-questions",
        vqa_questions(question_id="q"),
        "questions[1]",
        "field 'question_id' must be an integer",
    ),
    (
        "vqa-questions",
        vqa_questions(image_id=None),
        "questions[1] (question_id 11)",
        "field 'image_id' must be an integer",
    ),
    (
        "vqa-questions",
        vqa_questions(question_id=10),
        "questions[1]",
        "question_id 10 repeats the question_id of questions[0]",
    ),
    (
        "vqa-questions",
        {"data_subtype": 2014, "questions": []},
        "the top level",
        "field 'data_subtype' must be a",
    ),
    (
        "vqa-annotations",
        vqa_annotations(question_id=10.5),
        "annotations[1]",
        "field 'question_id' must be an integer",
    ),
    (
        "vqa-annotations",
        vqa_annotations(question_id=10),
        "annotations[1]",
        "question_id 10 repeats the question_id",
    ),
    (
        "vqa-annotations",
        vqa_annotations(answers=[{"answer": None}]),
        "annotations[1] (question_id 11).answers[0]",
        "field 'answer' must be a string",
    ),
    (
        "vqa-annotations",
        vqa_annotations(answers={"answer": "yes"}),
        "annotations[1] (question_id 11)",
        "field 'answers' must be a list",
    ),
    ("coco", "[" * 100_000 + "]" * 100_000, "JSON nested too deeply", ""),
    (
        "refcoco",
        '[{"image": "a.jpg", "phrases": ' + "[" * 50_000 + "]" * 50_000 + "}]",
        "JSON nested too deeply",
        "",
    ),
]


def read(fmt: str, file: Path, root: Path, skipped: Counter) -> list:
    if fmt == "coco":
        return read_coco(file, root, skipped)
    if fmt == "karpathy":
        return read_karpathy(json.loads(file.read_text()), file, root, "train", skipped)
    if fmt == "refcoco":
        return read_grounding(file, root, skipped)
    if fmt == "csv":
        return read_table(file, root, "filepath", "title", "\t", skipped)
    questions, answers = file.parent / "questions.json", file.parent / "answers.json"
    if not questions.exists():
        questions.write_text(json.dumps(vqa_questions(0)))
    if not answers.exists():
        answers.write_text(json.dumps(vqa_annotations(0)))
    return read_vqa(
        questions, answers, root, "{data_subtype}/COCO_{data_subtype}_{image_id:012d}.jpg", skipped
    )


@pytest.mark.parametrize(("fmt", "content", "record", "problem"), JSON_ERRORS)
def test_a_malformed_json_field_is_an_error_naming_file_record_and_field(root, fmt, content, record, problem):
    name = {"vqa-questions": "questions.json", "vqa-annotations": "answers.json"}.get(fmt, f"{fmt}.json")
    file = root.parent / name
    file.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError) as error:
        read(fmt, file, root, Counter())
    assert str(error.value).startswith(f"{file}: {record}"), error.value
    assert problem in str(error.value)


HEADER = "filepath\ttitle\n"
TABLE_ERRORS = [
    # (table text, line named, what is wrong)
    ("filepath\ttitle\ttitle\na.jpg\tx\ty\n", "line 1", "header repeats column(s) ['title']"),
    ("title\tfilepath\tfilepath\nx\ta.jpg\tb.jpg\n", "line 1", "header repeats column(s) ['filepath']"),
    (
        HEADER + 'a.jpg\tok\nb.jpg\t"never closed\n' + "c.jpg\tthird\n" * 28,
        "line 3",
        "unexpected end of data",
    ),
    (HEADER + 'a.jpg\tok\nb.jpg\t"closed" then text\nc.jpg\tx\n', "line 3", "expected after '\"'"),
    (HEADER + 'a.jpg\t"spans\ntwo lines"\nb.jpg\tx\n', "line 2", "field 'title' spans several lines"),
    (HEADER + 'a.jpg\tx\nb.jpg\ty\n"c\n.jpg"\tz\n', "line 4", "field 'filepath' spans several lines"),
    ("", "empty file", ""),
]


@pytest.mark.parametrize(("text", "where", "problem"), TABLE_ERRORS)
def test_a_broken_table_is_an_error_naming_file_and_line(root, text, where, problem):
    file = root.parent / "train.tsv"
    file.write_text(text)
    with pytest.raises(ValueError) as error:
        read("csv", file, root, Counter())
    assert str(error.value).startswith(f"{file}: {where}"), error.value
    assert problem in str(error.value)


def table(*rows: str, header: str = HEADER) -> str:
    return header + "a.jpg\tcap 1\nb.jpg\tcap 2\nc.jpg\tcap 3\n" + "".join(rows)


def coco_with(*annotations: dict, images: list | None = None) -> str:
    return json.dumps(
        coco(images, [{"image_id": i, "caption": f"cap {i}"} for i in GOOD] + list(annotations))
    )


def coco_with_image(file_name: str) -> str:
    images = [{"id": i, "file_name": f} for i, f in GOOD.items()] + [{"id": 4, "file_name": file_name}]
    return coco_with({"image_id": 4, "caption": "x"}, images=images)


GOOD_CAPTIONS = {"a.jpg": ("cap 1",), "b.jpg": ("cap 2",), "c.jpg": ("cap 3",)}
SKIPS = [
    *[
        ("coco", coco_with_image(name), {"bad_encoding": 1}, {})
        for name in ("\ud800.jpg", "a\x00.jpg", "x/\udcff")
    ],
    ("coco", coco_with_image("nope.jpg"), {"missing_file": 1}, {}),
    ("coco", coco_with_image("../a.jpg"), {"outside_root": 1}, {}),
    # (format, file text, reason -> count, per image: a caption kept besides its GOOD_CAPTIONS (a string)
    # or every caption it keeps (a tuple))
    *[
        ("coco", coco_with({"image_id": 2, "caption": bad}), {"empty_caption": 1}, {})
        for bad in ("\x00\x01\x02", "\u200b\u200d", " \x7f\t", "\x1b\x07", "", None, 5, ["x"])
    ],
    *[
        ("coco", coco_with({"image_id": 1, "caption": bad}), {"bad_encoding": 1}, {})
        for bad in ("\ud800", "a \udfff b", "x\udc80")
    ],
    (
        "coco",
        coco_with({"image_id": 9, "caption": "x"}, {"image_id": 9.0, "caption": "y"}),
        {"unknown_image": 2},
        {},
    ),
    ("coco", coco_with({"image_id": 3, "caption": "more\x00 text"}), {}, {"c.jpg": "more\x00 text"}),
    (
        "karpathy",
        json.dumps(karpathy(sentences=[{"raw": "\x00"}, {"raw": "\ud83d"}, {"raw": "ok"}])),
        {"empty_caption": 1, "bad_encoding": 1},
        {"b.jpg": ("ok",)},
    ),
    ("csv", table("d.jpg\t\x01\x02\n", "a.jpg\t\u2060\n"), {"empty_caption": 2}, {}),
    ("csv", table("a.jpg\tx\textra\n", "b.jpg\n", "\n"), {"malformed_row": 2}, {}),
    ("csv", table("b.jpg\t" + "long " * 40_000 + "\n"), {}, {"b.jpg": ("long " * 40_000).strip()}),
    ("csv", table('c.jpg\t"a ""quoted"" caption"\n'), {}, {"c.jpg": 'a "quoted" caption'}),
    ("csv", table('"a.jpg"\t"caption, with comma"\n'), {}, {"a.jpg": "caption, with comma"}),
]


@pytest.mark.parametrize(("fmt", "text", "counted", "extra"), SKIPS)
def test_bad_content_is_a_counted_skip_and_the_good_records_are_kept_exactly(root, fmt, text, counted, extra):
    file = root.parent / ("train.tsv" if fmt == "csv" else f"{fmt}.json")
    file.write_text(text)  # json.dumps writes a lone surrogate as the escape \ud800: valid JSON text
    skipped: Counter = Counter()
    records = read(fmt, file, root, skipped)
    assert dict(skipped) == counted
    expected = {
        name: (*caps, extra[name]) if isinstance(extra.get(name), str) else extra.get(name, caps)
        for name, caps in GOOD_CAPTIONS.items()
    }
    assert {Path(r.path).name: r.captions for r in records} == expected
    if fmt == "coco":
        assert [r.image_id for r in records] == [1, 2, 3]


def jpeg_bytes() -> bytes:
    import io

    from tests.datamodules.conftest import photo

    buffer = io.BytesIO()
    photo(width=8, height=8).save(buffer, "JPEG")
    return buffer.getvalue()


SHARD_CASES = [
    # (members besides the good keys a, b, reason -> count)
    ({"c.jpg": None, "c.txt": b"\xff\xfe caption"}, {"bad_encoding": 1}),
    ({"c.jpg": None, "c.txt": "\ud800".encode("utf-8", "surrogatepass")}, {"bad_encoding": 1}),
    ({"c.jpg": None, "c.txt": b"\x00\x01"}, {"empty_caption": 1}),
    ({"c.jpg": None, "c.json": b'{"caption": '}, {"malformed_json": 1}),
    ({"c.jpg": None, "c.json": b"[" * 100_000 + b"]" * 100_000}, {"malformed_json": 1}),
    ({"c.jpg": None, "c.json": b'["a caption"]'}, {"empty_caption": 1}),
    ({"c.jpg": None, "c.json": b'{"caption": null}'}, {"empty_caption": 1}),
    ({"c.jpg": None, "c.json": b'{"caption": "\\ud800"}'}, {"bad_encoding": 1}),
    ({"c.jpg": None}, {"empty_caption": 1}),
    ({"c.txt": b"no image"}, {"missing_file": 1}),
    ({"c.jpg": None, "c.json": b'{"caption": "from json"}', "c.txt": b"from text"}, {}),
]


@pytest.mark.parametrize(("members", "counted"), SHARD_CASES)
def test_webdataset_members_with_bad_captions_are_counted_and_the_rest_kept(tmp_path, members, counted):
    import io
    import tarfile

    from vlp.datamodules.webdataset import read_shards

    image = jpeg_bytes()
    good = {"a.jpg": image, "a.txt": b"caption a", "b.jpg": image, "b.json": b'{"caption": "caption b"}'}
    with tarfile.open(tmp_path / "shard.tar", "w") as archive:
        for name, data in {**good, **members}.items():
            data = image if data is None else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    skipped: Counter = Counter()
    records = read_shards(tmp_path / "shard.tar", skipped)
    assert dict(skipped) == counted
    kept = {record.key: record.captions for record in records}
    expected = {"shard.tar/a": ("caption a",), "shard.tar/b": ("caption b",)}
    if not counted:
        expected["shard.tar/c"] = ("from text",)
    assert kept == expected
