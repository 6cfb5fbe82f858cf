"""Real-format data through the `vlp` command: a COCO-style folder trains end to end with the short path
overrides, skipped samples show up in TensorBoard, and misconfigured paths fail before training."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vlp.cli import run
from vlp.cli.data import main as data_main

from ..datamodules.conftest import write_coco, write_jpeg

CAPTIONS = str(Path(__file__).parents[2] / "configs" / "pretrain" / "captions.yaml")
SMALL = [
    "--trainer.max_steps=4",
    "--trainer.val_check_interval=2",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--data.sources.captions.init_args.batch_size=8",
    "--data.sources.captions.init_args.num_workers=0",
    "--data.sources.captions.init_args.image_size=32",
    "--model.init_args.backbone.init_args.vision={image_size: 32, patch_size: 16, width: 32, depth: 1, heads: 2}",
    "--model.init_args.backbone.init_args.text={width: 32, depth: 1, heads: 2, max_len: 40}",
    "--model.init_args.backbone.init_args.fusion={depth: 1, heads: 2}",
]


@pytest.fixture
def coco_run(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for split, count in (("train", 32), ("val", 8)):
        images, captions = {}, []
        for index in range(count):
            image_id = 1000 * (split == "val") + index
            images[image_id] = f"{split}/{image_id}.jpg"
            write_jpeg(tmp_path / "images" / images[image_id], seed=image_id, width=48, height=36)
            captions += [(image_id, f"photo number {index}"), (image_id, f"another photo {index}")]
        write_coco(tmp_path / f"{split}.json", images, captions)
    (tmp_path / "images/train/5.jpg").write_bytes(b"GIF89a but not really")
    return tmp_path


def test_captions_config_trains_on_a_coco_folder_and_writes_metrics(coco_run: Path):
    cli = run(
        [
            "fit",
            "--config",
            CAPTIONS,
            "--data.train_annotations=train.json",
            "--data.val_annotations=val.json",
        ]
        + ["--data.image_root=images", "--data.max_bad_fraction=0.1", *SMALL]
    )
    assert cli.trainer.global_step == 4
    folder = Path(cli.trainer.log_dir)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert {
        "val/retrieval/i2t_r1",
        "val/itm/acc",
        "val/mlm/acc",
        "val/caption/bleu4",
        "val/caption/cider",
    } <= set(metrics)
    assert metrics["val/retrieval/t2i_r10"] == 1.0  # 8 val images: every caption's image is in the top 10
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    assert "data/skipped/not_an_image" in events.Tags()["scalars"]
    assert cli.datamodule.skipped == {"not_an_image": 1}


def test_short_overrides_reach_the_source_and_bad_paths_fail_before_training(coco_run: Path):
    # jsonargparse re-raises a source's error as a ValueError that quotes it
    with pytest.raises(ValueError, match="image_root is not a directory: nowhere"):
        run(
            [
                "fit",
                "--config",
                CAPTIONS,
                "--data.train_annotations=train.json",
                "--data.image_root=nowhere",
                *SMALL,
            ]
        )
    with pytest.raises(ValueError, match="train_annotations: no such file: missing.json"):
        run(
            [
                "fit",
                "--config",
                CAPTIONS,
                "--data.train_annotations=missing.json",
                "--data.image_root=images",
                *SMALL,
            ]
        )
    with pytest.raises(ValueError, match="train_annotations is required"):
        run(["fit", "--config", CAPTIONS, "--data.image_root=images", *SMALL])
    with pytest.raises(ValueError, match="--data.input_dir: no data source takes 'input_dir'"):
        run(["fit", "--config", CAPTIONS, "--data.input_dir=x", "--data.image_root=images", *SMALL])


def test_too_many_bad_files_stop_the_run_with_the_summary(coco_run: Path):
    for index in range(6):
        (coco_run / f"images/train/{index}.jpg").write_bytes(b"")
    with pytest.raises(
        RuntimeError, match=r"max_bad_fraction=0.01 .*skipped \d+ of \d+ samples read \(empty_file: \d+\)"
    ):
        run(
            ["fit", "--config", CAPTIONS, "--data.train_annotations=train.json", "--data.image_root=images"]
            + ["--data.val_annotations=val.json", *SMALL]
        )


STREAMING = str(Path(__file__).parents[2] / "configs" / "pretrain" / "streaming.yaml")
STREAM_SMALL = [arg.replace("sources.captions.", "sources.stream.") for arg in SMALL]


@pytest.mark.slow
def test_optimize_inspect_and_fit_on_chunks(coco_run: Path):
    """`vlp data optimize` (own process: litdata switches to spawn), `inspect` on the chunks, then
    `vlp fit --config configs/pretrain/streaming.yaml --data.input_dir ...` with 2 loader workers, stopped
    and resumed mid-epoch."""
    command = [
        sys.executable,
        "-c",
        "import sys; from vlp.cli import main; main(sys.argv[1:])",
        "data",
        "optimize",
    ]
    for split in ("train", "val"):
        args = ["--input", f"{split}.json", "--image-root", "images", "--output", f"chunks/{split}"]
        done = subprocess.run(command + args, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]
    assert "samples written: 8" in done.stdout  # the val split
    assert data_main(["inspect", "chunks/train", "--sheet", "sheet.png", "--json", "summary.json"]) == 0
    summary = json.loads(Path("summary.json").read_text())
    assert summary["images"] == 31 and summary["captions"] == 62  # the broken image was left out by optimize
    sheet = Image.open("sheet.png")
    assert sheet.size == (4 * 192, 4 * (192 + 48))
    chunks = ["--config", STREAMING, "--data.input_dir=chunks/train", "--data.val_input_dir=chunks/val"]
    chunks += [*STREAM_SMALL, "--trainer.max_steps=6", "--data.sources.stream.init_args.num_workers=2"]
    straight = run(["fit", *chunks, "--trainer.default_root_dir=a", "--checkpoint.save_top_k=-1"])
    folder = Path(straight.trainer.log_dir)
    assert straight.trainer.global_step == 6
    assert "val/retrieval/t2i_r1" in json.loads((folder / "metrics.json").read_text())
    # stopped after step 2 and resumed: the same batches (order, crops, flips, captions), the same weights
    resumed = run(["fit", *chunks, "--ckpt_path", str(folder / "checkpoints" / "step=2.ckpt")])
    assert resumed.trainer.global_step == 6
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=0, rtol=0, msg=key)


def test_data_commands_report_bad_input_in_one_line(coco_run: Path, capsys):
    assert data_main(["inspect", "nothing.json"]) == 2
    assert capsys.readouterr().err == "vlp data inspect: error: annotation file not found: nothing.json\n"
    assert data_main(["inspect", "train.json"]) == 2
    assert "--image-root: not a directory: None (needed for coco)" in capsys.readouterr().err
    Path("broken.json").write_text('{"images": [}')
    assert data_main(["optimize", "--input", "broken.json", "--image-root", "images", "--output", "out"]) == 2
    assert "broken.json: malformed JSON at line 1, column 13" in capsys.readouterr().err


def bomb(path: Path) -> None:
    from ..datamodules.conftest import huge_png_header

    path.write_bytes(huge_png_header(100_000, 100_000))  # past Pillow's DecompressionBombError threshold


INSPECT_SURVIVES = [
    # (what is wrong, how to make it, skips by reason that `inspect` and `fit`'s reader both count)
    ("bomb header", lambda root, data: bomb(root / "b.jpg"), {}),
    ("bomb header twice", lambda root, data: (bomb(root / "a.jpg"), bomb(root / "b.jpg")), {}),
    ("zero bytes", lambda root, data: (root / "b.jpg").write_bytes(b""), {}),
    ("text as jpg", lambda root, data: (root / "b.jpg").write_text("hello"), {}),
    ("truncated", lambda root, data: (root / "b.jpg").write_bytes((root / "a.jpg").read_bytes()[:200]), {}),
    (
        "folder named .jpg",
        lambda root, data: (root / "b.jpg").unlink() or (root / "b.jpg").mkdir(),
        {"missing_file": 1},
    ),
    (
        "lone surrogate",
        lambda root, data: data["annotations"].append({"image_id": 1, "caption": "\ud800"}),
        {"bad_encoding": 1},
    ),
    (
        "control only",
        lambda root, data: data["annotations"].append({"image_id": 1, "caption": "\x00\x1b"}),
        {"empty_caption": 1},
    ),
    (
        "outside root",
        lambda root, data: (
            data["images"].append({"id": 9, "file_name": "../x.jpg"})
            or data["annotations"].append({"image_id": 9, "caption": "x"})
        ),
        {"outside_root": 1},
    ),
]


@pytest.mark.parametrize(
    ("problem", "make", "counted"), INSPECT_SURVIVES, ids=[c[0] for c in INSPECT_SURVIVES]
)
def test_inspect_survives_what_fit_survives_and_counts_by_the_same_rule(
    tmp_path, monkeypatch, problem, make, counted
):
    from vlp.datamodules.captions import read_coco

    monkeypatch.chdir(tmp_path)
    root = tmp_path / "images"
    for index, name in enumerate("abc"):
        write_jpeg(root / f"{name}.jpg", seed=index, width=24, height=18)
    data = {
        "images": [{"id": i, "file_name": f"{n}.jpg"} for i, n in enumerate("abc")],
        "annotations": [{"image_id": i, "caption": f"photo {n}"} for i, n in enumerate("abc")],
    }
    make(root, data)
    Path("data.json").write_text(json.dumps(data))
    args = ["inspect", "data.json", "--image-root", "images", "--samples", "4", "--json", "summary.json"]
    assert data_main(args) == 0
    summary = json.loads(Path("summary.json").read_text())
    reader_counts: Counter = Counter()
    read_coco(Path("data.json"), root, reader_counts)
    assert summary["skipped"] == dict(reader_counts) == counted
    assert Path("data-sheet.png").is_file()


INSPECT_REFUSES = [
    (
        "images as an object",
        {"images": {"0": {"id": 0, "file_name": "a.jpg"}}, "annotations": []},
        "the top level: field 'images' must be a list, got an object",
    ),
    (
        "id a word",
        {"images": [{"id": "one", "file_name": "a.jpg"}], "annotations": []},
        "images[0]: field 'id' must be an integer, got a string 'one'",
    ),
    (
        "id a list",
        {"images": [{"id": [1], "file_name": "a.jpg"}], "annotations": []},
        "images[0]: field 'id' must be an integer, got a list [1]",
    ),
    (
        "file_name null",
        {"images": [{"id": 1, "file_name": None}], "annotations": []},
        "images[0] (id 1): field 'file_name' must be a non-empty string, got null None",
    ),
    (
        "file_name a number",
        {"images": [{"id": 1, "file_name": 5}], "annotations": []},
        "images[0] (id 1): field 'file_name' must be a non-empty string, got a number 5",
    ),
    (
        "duplicate id",
        {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}], "annotations": []},
        "images[1]: id 1 repeats the id of images[0]",
    ),
    (
        "images an empty object",
        {"images": {}, "annotations": []},
        "the top level: field 'images' must be a list, got an object",
    ),
]


@pytest.mark.parametrize(("problem", "data", "message"), INSPECT_REFUSES, ids=[c[0] for c in INSPECT_REFUSES])
@pytest.mark.parametrize("command", ["inspect", "optimize"])
def test_data_commands_name_file_record_and_field_of_a_malformed_annotation(
    tmp_path, monkeypatch, capsys, problem, data, message, command
):
    monkeypatch.chdir(tmp_path)
    write_jpeg(tmp_path / "images" / "a.jpg")
    Path("data.json").write_text(json.dumps(data))
    args = ["data.json"] if command == "inspect" else ["--input", "data.json", "--output", "out"]
    assert data_main([command, *args, "--image-root", "images"]) == 2
    assert capsys.readouterr().err == f"vlp data {command}: error: data.json: {message}\n"


def test_optimize_never_copies_an_image_outside_the_root(coco_run: Path):
    secret = coco_run / "secret.jpg"
    write_jpeg(secret, seed=99)
    data = json.loads(Path("val.json").read_text())
    data["images"] += [{"id": 7001, "file_name": "../secret.jpg"}, {"id": 7002, "file_name": str(secret)}]
    data["annotations"] += [{"image_id": 7001, "caption": "x"}, {"image_id": 7002, "caption": "y"}]
    Path("leaky.json").write_text(json.dumps(data))
    command = [
        sys.executable,
        "-c",
        "import sys; from vlp.cli import main; main(sys.argv[1:])",
        "data",
        "optimize",
    ]
    args = ["--input", "leaky.json", "--image-root", "images", "--output", "chunks/leaky"]
    done = subprocess.run(command + args, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "samples written: 8" in done.stdout and "  outside_root: 2" in done.stdout
    secret_bytes = secret.read_bytes()[-64:]
    assert not any(secret_bytes in chunk.read_bytes() for chunk in Path("chunks/leaky").glob("*.bin"))


def test_contact_sheet_draws_accented_captions_with_their_letters():
    """'Côte d'Ivoire' is drawn with its 'ô' (DejaVu Sans), not the box a character the font lacks gets."""
    import io as _io

    from PIL import Image as _Image

    from vlp.cli.data import contact_sheet
    from vlp.datamodules.captions import CaptionRecord

    buffer = _io.BytesIO()
    _Image.new("RGB", (32, 32), (90, 120, 200)).save(buffer, "PNG")

    def sheet(caption: str) -> bytes:
        return contact_sheet([CaptionRecord(buffer.getvalue(), 0, (caption,))], 1).tobytes()

    assert sheet("Côte d'Ivoire") != sheet("C\u4e00te d'Ivoire")  # ô is a glyph of its own
    assert sheet("C\u4e00te d'Ivoire") == sheet("C\u4e01te d'Ivoire")  # missing characters: one box
