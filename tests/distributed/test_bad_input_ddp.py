"""Bad input under DDP: `vlp fit` on 2 CPU ranks (gloo) over a generated COCO folder with broken files that
each rank's shard draws. The skipped counts logged (`data/skipped/<reason>`) and summarised are the whole
run's (both ranks' loader skips, the annotation skips once), and `max_bad_fraction` judges the whole run:
both ranks stop together with the same summary."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vlp.datamodules.source import shard_order

from ..datamodules.conftest import write_coco, write_jpeg

REPO = Path(__file__).parents[2]
VLP = Path(sys.executable).parent / "vlp"
TRAIN_IMAGES, BATCH, STEPS, SEED = 40, 4, 4, 0


def drawn(rank: int) -> list[int]:
    """The train indices rank `rank` of 2 reads in the run's steps (the data module's seeded shard)."""
    return shard_order(TRAIN_IMAGES, SEED, epoch=0, rank=rank, world_size=2)[: STEPS * BATCH]


def isolated(indices: list[int], count: int) -> list[int]:
    """`count` of `indices` none of which follows another (a broken file is stepped over to the next one,
    which must be usable for one draw to count one skip)."""
    chosen: list[int] = []
    for index in indices:
        if all(abs(index - other) > 1 for other in chosen):
            chosen.append(index)
        if len(chosen) == count:
            return chosen
    raise AssertionError(f"not {count} isolated indices in {indices}")


def coco_folder(root: Path, broken: list[int]) -> None:
    """40 train + 8 val JPEGs, two captions each, one annotation naming an unknown image; `broken` train
    files are not images."""
    for split, count in (("train", TRAIN_IMAGES), ("val", 8)):
        images, captions = {}, []
        for index in range(count):
            image_id = 1000 * (split == "val") + index
            images[image_id] = f"{split}/{image_id}.jpg"
            write_jpeg(root / "images" / images[image_id], seed=image_id, width=40, height=32)
            captions += [(image_id, f"photo number {index}"), (image_id, f"another photo {index}")]
        if split == "train":
            captions.append((999, "an image nobody has"))
        write_coco(root / f"{split}.json", images, captions)
    for index in broken:
        (root / "images" / "train" / f"{index}.jpg").write_bytes(b"not a jpeg")


def fit(root: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [
        str(VLP), "fit",
        "--config", str(REPO / "configs" / "pretrain" / "captions.yaml"),
        "--config", str(REPO / "configs" / "strategy" / "ddp.yaml"),
        "--trainer.devices=2", "--trainer.accelerator=cpu",
        f"--trainer.max_steps={STEPS}", "--trainer.val_check_interval=2", "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--data.train_annotations=train.json", "--data.val_annotations=val.json", "--data.image_root=images",
        f"--data.sources.captions.init_args.batch_size={BATCH}",
        "--data.sources.captions.init_args.num_workers=0",
        "--data.sources.captions.init_args.image_size=32",
        "--model.init_args.backbone.init_args.vision={image_size: 32, patch_size: 16, width: 32, depth: 1, heads: 2}",
        "--model.init_args.backbone.init_args.text={width: 32, depth: 1, heads: 2, max_len: 40}",
        "--model.init_args.backbone.init_args.fusion={depth: 1, heads: 2}",
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_skip_counts_and_the_summary_are_summed_over_ranks(tmp_path: Path):
    rank0, rank1 = drawn(0), drawn(1)
    broken = isolated(rank0, 2) + isolated(rank1, 1)  # both ranks step over broken files: 2 + 1
    coco_folder(tmp_path, broken)
    done = fit(tmp_path, "--data.max_bad_fraction=0.1")
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "runs" / "captions" / "version_0"
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    last = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"] if tag.startswith("data/")}
    assert last == {"data/skipped/not_an_image": 3.0, "data/skipped/unknown_image": 1.0}
    # read: 40 + 8 annotated images and the unknown one, then per rank 4 steps of 4 (+ the skips) and 2
    # validations of 4 images
    read = 49 + 2 * (STEPS * BATCH) + 3 + 2 * 2 * 4
    summary = f"data: skipped 4 of {read} samples read (not_an_image: 3, unknown_image: 1)"
    assert summary in done.stdout + done.stderr
    assert "val/retrieval/t2i_r1" in json.loads((folder / "metrics.json").read_text())


@pytest.mark.slow
def test_max_bad_fraction_judges_the_whole_run_and_both_ranks_stop_together(tmp_path: Path):
    # every bad file on rank 1's shard; neither rank alone reads the 100 samples the check waits for
    coco_folder(tmp_path, isolated(drawn(1), 6))
    done = fit(tmp_path, "--data.max_bad_fraction=0.05")  # the unknown image alone is 1 of 49
    assert done.returncode != 0
    errors = re.findall(
        r"RuntimeError: data: more than max_bad_fraction=0.05 of the samples are unusable: "
        r"skipped (\d+) of (\d+) samples read",
        done.stderr,
    )
    # each rank raises with the same whole-run counts (rank 0 may end rank 1 before it prints)
    assert errors and len(set(errors)) == 1, done.stderr[-3000:]
    skipped, read = map(int, errors[0])
    assert read >= 100 and skipped == 1 + 6 and skipped > 0.05 * read
