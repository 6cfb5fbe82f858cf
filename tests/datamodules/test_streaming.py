"""litdata chunks: optimize-then-stream returns every sample byte-identical, ranks get disjoint shards, and a
stream stopped mid-epoch and resumed from its state continues without repeats or gaps."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer
from PIL import Image

from vlp.datamodules.multitask import SourceStream
from vlp.datamodules.streaming import ChunkRecords, StreamingSource

from .conftest import photo, write_coco, write_jpeg

OPTIMIZE_TIMEOUT_S = 180  # litdata's optimize once hung in shutdown; never let it hang the suite


def vlp_data(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`vlp data ...` in a fresh process (litdata switches multiprocessing to spawn for good)."""
    command = [
        sys.executable,
        "-c",
        "import sys; from vlp.cli import main; main(sys.argv[1:])",
        "data",
        *args,
    ]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=OPTIMIZE_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def coco_chunks(tmp_path_factory) -> tuple[Path, dict[int, tuple[bytes, list[str]]]]:
    """40 COCO images (JPEG and PNG) + 2 broken ones, optimized with 2 workers."""
    folder = tmp_path_factory.mktemp("coco")
    images, captions, expected = {}, [], {}
    for image_id in range(40):
        name = f"{image_id}.png" if image_id % 5 == 0 else f"{image_id}.jpg"
        path = folder / "images" / name
        if name.endswith(".png"):
            path.parent.mkdir(parents=True, exist_ok=True)
            photo(seed=image_id).save(path)
        else:
            write_jpeg(path, seed=image_id)
        images[image_id] = name
        texts = [f"image {image_id} left", f"second caption {image_id}"]
        captions += [(image_id, text) for text in texts]
        expected[image_id] = (path.read_bytes(), texts)
    (folder / "images/bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (folder / "images/empty.jpg").write_bytes(b"")
    images |= {100: "bad.jpg", 101: "empty.jpg"}
    captions += [(100, "broken"), (101, "empty")]
    write_coco(folder / "train.json", images, captions)
    out = vlp_data(
        "optimize", "--format", "coco", "--input", "train.json", "--image-root", "images",
        "--output", "chunks", "--num-workers", "2", "--chunk-bytes", "20KB", cwd=folder,
    )  # fmt: skip
    assert "samples written: 40" in out.stdout
    assert "skipped: 2" in out.stdout and "empty_file: 1" in out.stdout and "truncated_image: 1" in out.stdout
    return folder / "chunks", expected


def test_optimize_then_stream_is_byte_identical(coco_chunks):
    chunks, expected = coco_chunks
    records = ChunkRecords(str(chunks))
    assert len(records) == 40 and len(list(chunks.glob("*.bin"))) > 1  # several chunks
    seen = {}
    for index in range(len(records)):
        sample = records.sample(index)
        seen[sample["image_id"]] = (sample["image"], sample["captions"])
    assert seen == expected


def streams(chunks: Path, world: int, num_workers: int = 0) -> list[SourceStream]:
    source = StreamingSource(str(chunks), image_size=16, batch_size=4, num_workers=num_workers, seed=3)
    return [SourceStream("stream", source, seed=3, rank=rank, world_size=world) for rank in range(world)]


def image_ids(stream: SourceStream, batches: int) -> list[int]:
    return [i for _ in range(batches) for i in stream.next()["image_id"].tolist()]


def test_two_ranks_read_disjoint_shards_that_cover_the_epoch(coco_chunks):
    rank0, rank1 = streams(coco_chunks[0], world=2)
    first, second = image_ids(rank0, 5), image_ids(rank1, 5)  # 20 per rank = one epoch
    assert not set(first) & set(second)
    assert set(first) | set(second) == set(range(40))


def test_a_stream_stopped_mid_epoch_resumes_without_repeats_or_gaps(coco_chunks):
    (straight,) = streams(coco_chunks[0], world=1, num_workers=2)
    reference = image_ids(straight, 16)  # 64 samples: more than one epoch of 40
    (stopped,) = streams(coco_chunks[0], world=1, num_workers=2)
    before = image_ids(stopped, 7)
    state = json.loads(json.dumps(stopped.state_dict()))  # what a checkpoint holds
    del stopped
    (resumed,) = streams(coco_chunks[0], world=1, num_workers=2)
    resumed.load_state_dict(state)
    after = image_ids(resumed, 9)
    assert before + after == reference
    assert sorted(reference[:40]) == list(range(40))  # the first epoch has every sample once


def test_streamed_batches_carry_captions_and_the_saved_vocabulary(coco_chunks):
    (stream,) = streams(coco_chunks[0], world=1)
    batch = stream.next()
    assert batch["image"].shape == (4, 3, 16, 16) and batch["skipped"] == {}
    tokenizer = stream.source.tokenizer
    assert tokenizer.unk_token_id not in batch["input_ids"]
    decoded = tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert decoded == [c.lower() for c in batch["captions"]]


@pytest.mark.slow
def test_webdataset_shards_and_grounding_boxes_survive_optimize(tmp_path: Path):
    shard = tmp_path / "shard-000.tar"
    originals = {}
    with tarfile.open(shard, "w") as archive:
        for index in range(6):
            key = f"{index:05d}"
            buffer = io.BytesIO()
            photo(seed=index).save(buffer, "JPEG" if index % 2 else "PNG")
            members = {f"{key}.{'jpg' if index % 2 else 'png'}": buffer.getvalue()}
            if index == 5:
                members[f"{key}.txt"] = b"   "  # no usable caption
            elif index % 2:
                members[f"{key}.txt"] = f"shard caption {index}".encode()
            else:
                members[f"{key}.json"] = json.dumps({"caption": f"json caption {index}", "url": "x"}).encode()
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            originals[index] = buffer.getvalue()
    out = vlp_data("optimize", "--input", str(shard), "--output", "wds", cwd=tmp_path)
    assert "samples written: 5" in out.stdout and "empty_caption: 1" in out.stdout
    records = ChunkRecords(str(tmp_path / "wds"))
    got = {bytes(records.sample(i)["image"]): records.sample(i)["captions"] for i in range(5)}
    assert got == {originals[i]: [f"{'shard' if i % 2 else 'json'} caption {i}"] for i in range(5)}

    write_jpeg(tmp_path / "img" / "big.jpg", width=200, height=100)
    entries = [{"image": "big.jpg", "phrases": ["the right half"], "bbox": [100, 0, 100, 100]}]
    (tmp_path / "refs.json").write_text(json.dumps(entries))
    vlp_data(
        "optimize", "--input", "refs.json", "--image-root", "img", "--output", "refs", "--max-side", "50",
        cwd=tmp_path,
    )  # fmt: skip
    record = ChunkRecords(str(tmp_path / "refs"))[0]
    assert Image.open(io.BytesIO(record.path)).size == (50, 25)
    assert record.box == (25.0, 0.0, 25.0, 25.0)  # the box shrinks with the image
    source = StreamingSource(str(tmp_path / "refs"), val_input_dir=str(tmp_path / "refs"), image_size=32)
    item = source.dataset("val")[0]
    assert item["phrase"] == "the right half" and item["box"].tolist() == [0.75, 0.5, 0.5, 1.0]


@pytest.fixture(scope="module")
def s3_chunks(coco_chunks, tmp_path_factory) -> Iterator[str]:
    """The chunk folder (with its saved vocabulary) uploaded with boto3 to a local S3 server (moto) on a
    free port; boto3, hence litdata, finds it through `AWS_ENDPOINT_URL`, inherited by loader workers."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    environment = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in environment.items():
            patch.setenv(key, value)
        client = boto3.client("s3")
        client.create_bucket(Bucket="vlp")
        for path in coco_chunks[0].rglob("*"):
            if path.is_file():
                client.upload_file(str(path), "vlp", f"coco/train/{path.relative_to(coco_chunks[0])}")
        yield "s3://vlp/coco/train"
    server.stop()


def test_chunks_stream_from_an_s3_url_byte_identical_with_the_saved_vocabulary(
    s3_chunks, coco_chunks, tmp_path
):
    records = ChunkRecords(s3_chunks, cache_dir=str(tmp_path / "cache"))
    assert len(records) == 40
    seen = {}
    for index in range(len(records)):
        sample = records.sample(index)
        seen[sample["image_id"]] = (sample["image"], sample["captions"])
    assert seen == coco_chunks[1]
    source = StreamingSource(s3_chunks, image_size=16, cache_dir=str(tmp_path / "cache2"))
    local = StreamingSource(str(coco_chunks[0]), image_size=16)
    assert source.tokenizer.get_vocab() == local.tokenizer.get_vocab()


def test_an_s3_stream_stopped_mid_epoch_resumes_as_the_local_one_runs(s3_chunks, coco_chunks, tmp_path):
    (local,) = streams(coco_chunks[0], world=1, num_workers=2)
    reference = image_ids(local, 16)

    def s3_stream(cache: str) -> SourceStream:
        source = StreamingSource(
            s3_chunks, image_size=16, batch_size=4, num_workers=2, seed=3, cache_dir=cache
        )
        return SourceStream("stream", source, seed=3)

    stopped = s3_stream(str(tmp_path / "a"))
    before = image_ids(stopped, 7)
    state = json.loads(json.dumps(stopped.state_dict()))
    del stopped
    resumed = s3_stream(str(tmp_path / "b"))  # a fresh cache: every chunk read again from the bucket
    resumed.load_state_dict(state)
    assert before + image_ids(resumed, 9) == reference
