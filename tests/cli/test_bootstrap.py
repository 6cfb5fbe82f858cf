"""`vlp data bootstrap` (CapFilt) on the shapes default's backbone after a short pre-training, through real
processes: it keeps true pairs and drops pairs whose caption was swapped with another image's; a run killed
with SIGKILL and restarted writes what an uninterrupted run writes; two gloo ranks write disjoint shards whose
union is one rank's output; an unreadable image is a counted skip; a checkpoint without a caption decoder or
an ITM head is refused with what it lacks."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vlp.cli.data import main as data_main
from vlp.datamodules.shapes import ShapesDataset
from vlp.datamodules.streaming import ChunkRecords, StreamingSource

from ..support.gloo_ranks import run_on_ranks

pytestmark = pytest.mark.slow  # a short pre-training and several bootstrap processes

ROOT = Path(__file__).parents[2]
PRETRAIN = ROOT / "tests" / "configs" / "bootstrap-pretrain.yaml"
IMAGES = 48
BAD_IMAGE = 5  # its file holds no image
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
for name in (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "MASTER_ADDR",
    "MASTER_PORT",
):
    ENV.pop(name, None)


def vlp(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vlp.cli", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
        **kwargs,
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The shapes default's backbone after 300 steps of ITC + ITM (easy negatives) + captioning."""
    folder = tmp_path_factory.mktemp("pretrain")
    run = vlp("fit", "--config", str(PRETRAIN), "--trainer.default_root_dir", str(folder))
    assert run.returncode == 0, run.stderr[-3000:]
    return folder / "checkpoints" / "last.ckpt"


def is_swapped(image_id: int) -> bool:
    return image_id % 2 == 1  # every other pair: a known share of one half


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """A CSV of shapes test-split images: even rows with their own caption, odd rows with the caption of
    the image half the set away; one image file is not an image."""
    folder = tmp_path_factory.mktemp("pairs")
    data = ShapesDataset("test", IMAGES, 48, 3, 0)
    captions = [data.scene(i).references()[0] for i in range(IMAGES)]
    (folder / "images").mkdir()
    rows = []
    for i in range(IMAGES):
        data.scene(i).render().save(folder / "images" / f"{i}.png")
        caption = captions[(i + IMAGES // 2) % IMAGES] if is_swapped(i) else captions[i]
        rows.append({"filepath": f"{i}.png", "title": caption})
    (folder / "images" / f"{BAD_IMAGE}.png").write_bytes(b"not an image at all")
    with open(folder / "pairs.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, ["filepath", "title"])
        writer.writeheader()
        writer.writerows(rows)
    return folder


def bootstrap_args(checkpoint: Path, pairs: Path, output: Path) -> list[str]:
    return [
        "bootstrap",
        f"--model={checkpoint}",
        f"--input={pairs / 'pairs.csv'}",
        f"--image-root={pairs / 'images'}",
        f"--output={output}",
        "--captions-per-image=2",
        "--threshold=0.5",
        "--shard-size=4",
        "--batch-size=4",
        "--max-bad-fraction=0.05",
    ]


@pytest.fixture(scope="module")
def uninterrupted(checkpoint: Path, pairs: Path, tmp_path_factory) -> tuple[Path, str]:
    output = tmp_path_factory.mktemp("bootstrap") / "out"
    run = vlp("data", *bootstrap_args(checkpoint, pairs, output))
    assert run.returncode == 0, run.stderr[-3000:]
    return output, run.stdout


def decisions(output: Path) -> list[dict]:
    with open(output / "decisions.csv", newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def chunk_samples(output: Path) -> list[dict]:
    records = ChunkRecords(str(output))
    return [records.sample(i) for i in range(len(records))]


def test_swapped_pairs_are_kept_far_less_often_than_true_pairs(uninterrupted):
    output, stdout = uninterrupted
    originals = [row for row in decisions(output) if row["source"] == "original"]
    true = [int(row["kept"]) for row in originals if not is_swapped(int(row["image_id"]))]
    swapped = [int(row["kept"]) for row in originals if is_swapped(int(row["image_id"]))]
    true_share, swapped_share = sum(true) / len(true), sum(swapped) / len(swapped)
    print(
        f"kept share: true pairs {true_share:.3f} ({len(true)}), swapped pairs {swapped_share:.3f} ({len(swapped)})"
    )
    assert true_share >= 0.8 and swapped_share <= 0.25, (true_share, swapped_share)
    assert "images: 48 read" in stdout and "original captions:" in stdout and "synthetic captions:" in stdout


def test_output_is_a_streaming_data_set_of_the_kept_pairs_and_the_csv_holds_every_decision(uninterrupted):
    output, stdout = uninterrupted
    rows = decisions(output)
    counts = json.loads((output / "counts.json").read_text())
    synthetic = [row for row in rows if row["source"] == "synthetic"]
    assert len(synthetic) == 2 * (IMAGES - 1)  # two per usable image
    assert all(row["caption"] and 0 <= float(row["itm_score"]) <= 1 for row in synthetic)
    assert counts["synthetic/kept"] == sum(int(r["kept"]) for r in synthetic) > 0
    kept = {}
    for row in rows:
        if row["kept"] == "1":
            assert float(row["itm_score"]) >= 0.5
            kept.setdefault(int(row["image_id"]), []).append(row["caption"])
    written = {sample["image_id"]: sample["captions"] for sample in chunk_samples(output)}
    assert written == kept
    source = StreamingSource(input_dir=str(output), image_size=48)  # what `vlp fit` trains on
    batch = source.collate([source.dataset("train")[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 48, 48)


def test_an_unreadable_image_is_a_counted_skip_in_the_counts_and_the_csv(uninterrupted):
    output, stdout = uninterrupted
    counts = json.loads((output / "counts.json").read_text())
    assert counts["images_skipped/not_an_image"] == 1 and counts["images"] == IMAGES
    bad = [row for row in decisions(output) if int(row["image_id"]) == BAD_IMAGE]
    assert [(r["source"], r["kept"], r["reason"]) for r in bad] == [("image", "0", "not_an_image")]
    assert "not_an_image: 1" in stdout


def test_a_run_killed_mid_way_resumes_to_the_uninterrupted_output(checkpoint, pairs, uninterrupted, tmp_path):
    output = tmp_path / "out"
    command = [sys.executable, "-m", "vlp.cli", "data", *bootstrap_args(checkpoint, pairs, output)]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = output / "shards"
    deadline = time.monotonic() + 600
    while not (shards / "shard-00001").is_dir() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done = sorted(p.name for p in shards.glob("shard-*"))
    assert 2 <= len(done) < IMAGES // 4 and not (output / "index.json").exists()

    resumed = vlp("data", *bootstrap_args(checkpoint, pairs, output))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"({len(done)} complete from an earlier run)" in resumed.stdout
    reference = uninterrupted[0]
    assert (output / "decisions.csv").read_bytes() == (reference / "decisions.csv").read_bytes()
    assert (output / "counts.json").read_text() == (reference / "counts.json").read_text()
    assert chunk_samples(output) == chunk_samples(reference)
    assert not list(shards.glob(".shard-*"))  # the killed shard's temporary folder is gone


def bootstrap_on_rank(rank: int, out_dir: str, args: list[str]) -> None:
    torch.set_num_threads(1)
    assert data_main(args) == 0


def test_two_ranks_write_disjoint_shards_whose_union_is_one_ranks_output(
    checkpoint, pairs, uninterrupted, tmp_path
):
    output = tmp_path / "out"
    run_on_ranks(bootstrap_on_rank, tmp_path, bootstrap_args(checkpoint, pairs, output))
    reference = uninterrupted[0]
    shards = sorted((output / "shards").glob("shard-*"))
    assert len(shards) == IMAGES // 4
    for number, shard in enumerate(shards):
        assert json.loads((shard / "written_by.json").read_text()) == {"rank": number % 2, "world": 2}
        alone = reference / "shards" / shard.name
        assert (shard / "decisions.csv").read_bytes() == (alone / "decisions.csv").read_bytes()
    assert (output / "decisions.csv").read_bytes() == (reference / "decisions.csv").read_bytes()
    assert chunk_samples(output) == chunk_samples(reference)


@pytest.mark.parametrize("remove", ["decoder", "itm", "both"])
def test_a_checkpoint_without_decoder_or_itm_head_is_refused_naming_what_it_lacks(
    checkpoint, pairs, tmp_path, capsys, remove
):
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if remove in ("decoder", "both"):
        stored["vlp_architecture"]["caption_decoder"] = False
    if remove in ("itm", "both"):
        stored["state_dict"] = {k: v for k, v in stored["state_dict"].items() if ".itm." not in k}
    broken = tmp_path / "broken.ckpt"
    torch.save(stored, broken)
    args = bootstrap_args(broken, pairs, tmp_path / "out")
    assert data_main([*args, f"--tokenizer={checkpoint.parents[1] / 'config.yaml'}"]) == 2
    error = capsys.readouterr().err
    assert ("caption decoder" in error) == (remove != "itm")
    assert ("ITM head" in error) == (remove != "decoder")


def test_devices_two_runs_two_local_processes_to_the_same_output(checkpoint, pairs, uninterrupted, tmp_path):
    output = tmp_path / "out"
    run = vlp("data", *bootstrap_args(checkpoint, pairs, output), "--devices=2")
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = {
        json.loads((s / "written_by.json").read_text())["rank"] for s in (output / "shards").glob("shard-*")
    }
    assert ranks == {0, 1}
    assert (output / "decisions.csv").read_bytes() == (uninterrupted[0] / "decisions.csv").read_bytes()
    assert chunk_samples(output) == chunk_samples(uninterrupted[0])
