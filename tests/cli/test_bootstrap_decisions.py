"""`vlp data bootstrap`'s decisions for one shard, with a stand-in model whose match probability is read off
the caption: the threshold, `--keep-original-if-matching`, empty synthetic captions and unreadable images,
and the merged CSV and counts of several shards. Seconds; the real model runs in test_bootstrap.py."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlp.cli.bootstrap import add_arguments, bootstrap_shard, merge_shards, shard_folder, write_shard
from vlp.datamodules.captions import CaptionRecord
from vlp.datamodules.streaming import ChunkRecords


class ScoredByText:
    """Synthetic captions from a script; P(match) = the number after '@' in the caption."""

    def __init__(self, synthetic: dict[int, list[str]]) -> None:
        self.synthetic = synthetic  # image's first pixel value -> its captions

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def sample_captions(self, images, per_image, settings, generator) -> list[str]:
        keys = [round(float(image[0, 0, 0]) * 127.5 + 127.5) for image in images]
        return [caption for key in keys for caption in self.synthetic[key][:per_image]]

    def match_probability(self, images, rows, captions: list[str]) -> torch.Tensor:
        return torch.tensor([float(caption.rsplit("@", 1)[1]) for caption in captions])


def arguments(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model=m", "--output=o", "--captions-per-image=2", "--image-size=8", *extra])
    return args


def records(tmp_path: Path) -> list[CaptionRecord]:
    paths = []
    for value in (10, 20, 30):
        path = tmp_path / f"{value}.png"
        Image.new("RGB", (8, 8), (value, value, value)).save(path)
        paths.append(str(path))
    (tmp_path / "bad.png").write_bytes(b"")
    return [
        CaptionRecord(paths[0], 0, ("original a @0.9",)),
        CaptionRecord(str(tmp_path / "bad.png"), 1, ("never scored @1.0",)),
        CaptionRecord(paths[1], 2, ("original b @0.2",)),
        CaptionRecord(paths[2], 3, ("original c @0.5", "second original @0.49")),
    ]


MODEL = ScoredByText(
    {10: ["syn a1 @0.7", "syn a2 @0.3"], 20: ["syn b1 @0.8", ""], 30: ["syn c1 @0.1", "syn c2 @0.6"]}
)


def table(result) -> list[tuple]:
    return [(d["image_id"], d["caption"], d["source"], d["kept"], d["reason"]) for d in result.decisions]


def test_pairs_at_or_above_the_threshold_are_kept_and_every_decision_is_recorded(tmp_path):
    result = bootstrap_shard(MODEL, records(tmp_path), 0, arguments("--threshold=0.5"), torch.device("cpu"))
    assert table(result) == [
        (1, "", "image", False, "empty_file"),
        (0, "original a @0.9", "original", True, "kept"),
        (0, "syn a1 @0.7", "synthetic", True, "kept"),
        (0, "syn a2 @0.3", "synthetic", False, "below_threshold"),
        (2, "original b @0.2", "original", False, "below_threshold"),
        (2, "syn b1 @0.8", "synthetic", True, "kept"),
        (2, "", "synthetic", False, "empty_caption"),
        (3, "original c @0.5", "original", True, "kept"),
        (3, "second original @0.49", "original", False, "below_threshold"),
        (3, "syn c1 @0.1", "synthetic", False, "below_threshold"),
        (3, "syn c2 @0.6", "synthetic", True, "kept"),
    ]
    written = {json.loads(s["meta"])["image_id"]: json.loads(s["meta"])["captions"] for s in result.samples}
    assert written == {
        0: ["original a @0.9", "syn a1 @0.7"],
        2: ["syn b1 @0.8"],
        3: ["original c @0.5", "syn c2 @0.6"],
    }
    assert result.counts["images"] == 4 and result.counts["images_skipped/empty_file"] == 1
    assert result.counts["original/kept"] == 2 and result.counts["synthetic/kept"] == 3
    assert result.counts["synthetic/empty_caption"] == 1 and result.counts["images_written"] == 3


def test_keep_original_if_matching_adds_synthetic_captions_only_where_no_original_passes(tmp_path):
    args = arguments("--threshold=0.5", "--keep-original-if-matching")
    result = bootstrap_shard(MODEL, records(tmp_path), 0, args, torch.device("cpu"))
    kept = {(d["image_id"], d["caption"]) for d in result.decisions if d["kept"]}
    assert kept == {(0, "original a @0.9"), (2, "syn b1 @0.8"), (3, "original c @0.5")}
    reasons = {d["caption"]: d["reason"] for d in result.decisions}
    assert reasons["syn a1 @0.7"] == reasons["syn c2 @0.6"] == "original_kept"


def test_shards_merge_into_one_data_set_csv_and_counts(tmp_path):
    args = arguments("--threshold=0.5")
    parts = records(tmp_path)
    output = tmp_path / "out"
    for shard, part in enumerate((parts[:2], parts[2:])):
        write_shard(output, shard, bootstrap_shard(MODEL, part, shard, args, torch.device("cpu")), "1MB")
        assert not list((output / "shards").glob(".shard-*"))  # written to a temporary name, then renamed
        assert (shard_folder(output, shard) / "index.json").is_file()
    counts = merge_shards(output, 2)
    with open(output / "decisions.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["caption"] for row in rows] == [
        d[1] for d in table(bootstrap_shard(MODEL, parts, 0, args, torch.device("cpu")))
    ]
    chunks = ChunkRecords(str(output))
    assert [chunks[i].image_id for i in range(len(chunks))] == [0, 2, 3]
    assert counts["images"] == 4 and counts["synthetic/kept"] == 3


def test_bad_settings_are_refused(tmp_path):
    from vlp.cli.bootstrap import run_bootstrap

    with pytest.raises(ValueError, match="threshold"):
        run_bootstrap(arguments("--threshold=1.5"), records(tmp_path), None, [])


def test_a_rerun_with_other_settings_is_refused_rather_than_mixing_shards(tmp_path):
    from vlp.cli.bootstrap import check_settings

    (tmp_path / "shards").mkdir()
    check_settings(tmp_path, arguments("--threshold=0.5", "--devices=1"))
    check_settings(tmp_path, arguments("--threshold=0.5", "--devices=2", "--num-workers=3"))  # same shards
    with pytest.raises(ValueError, match=r"threshold: 0.5 -> 0.7.*another --output"):
        check_settings(tmp_path, arguments("--threshold=0.7"))


def test_no_synthetic_captions_filters_the_originals_alone(tmp_path):
    result = bootstrap_shard(
        MODEL, records(tmp_path), 0, arguments("--captions-per-image=0"), torch.device("cpu")
    )
    assert {d["source"] for d in result.decisions} == {"image", "original"}
    assert [d["caption"] for d in result.decisions if d["kept"]] == ["original a @0.9", "original c @0.5"]
