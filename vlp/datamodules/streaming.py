"""litdata chunks of encoded samples: writing them (`optimize`) and training on them (`StreamingSource`).

A chunk sample is `{"image": <the encoded file's bytes>, "meta": <JSON: image_id, captions, optional box>}`:
images stay JPEG/PNG (a tenth of decoded arrays), and `meta` keeps every format's fields in one structure
litdata can batch. Reading goes through the same `CaptionDataset` / `GroundingDataset` as files do, over a
lazy record list, so the order, the rank sharding and the resumable position come from the data module's
`EndlessSampler`: a resumed run neither repeats nor skips a sample.
"""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from vlp.datamodules.captions import SPLITS, CaptionDataset, CaptionRecord, CaptionSource
from vlp.datamodules.images import (
    MAX_IMAGE_PIXELS,
    SkipSample,
    decode_image,
    open_image,
    read_image_file,
)
from vlp.datamodules.refcoco import GroundingDataset, GroundingRecord
from vlp.datamodules.tokenizer import load_tokenizer
from vlp.datamodules.webdataset import ShardRecord

if TYPE_CHECKING:
    from litdata import StreamingDataset

TOKENIZER_FOLDER = "tokenizer"  # optimize saves the training captions' vocabulary here


def record_image_bytes(record: CaptionRecord | GroundingRecord | ShardRecord) -> bytes:
    if isinstance(record, ShardRecord):
        return record.member.read()
    return read_image_file(record.path)


def encode_sample(
    record: CaptionRecord | GroundingRecord | ShardRecord, max_side: int | None, skip_dir: str
) -> Iterator[dict]:
    """litdata's per-sample function (runs in its worker processes): check that the image decodes, shrink
    it when its longer side exceeds `max_side`, and yield the chunk sample; an unusable image yields
    nothing and appends its reason to a per-process file under `skip_dir` for the summary."""
    scale = 1.0
    try:
        data = record_image_bytes(record)
        image = open_image(data)
        if max_side is not None and max(image.size) > max_side:
            rgb = decode_image(data)
            rgb.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
            scale = rgb.width / image.width
            buffer = io.BytesIO()
            rgb.save(buffer, "JPEG", quality=95)
            data = buffer.getvalue()
        else:
            decode_image(data)  # CMYK, 16-bit, palette: converted at read time, refused here if broken
    except SkipSample as skip:
        with open(Path(skip_dir) / f"{os.getpid()}.txt", "a") as log:
            log.write(skip.reason + "\n")
        return
    meta: dict = {"image_id": record.image_id, "captions": list(record.captions)}
    if isinstance(record, GroundingRecord):
        meta["box"] = [value * scale for value in record.box]
    yield {"image": data, "meta": json.dumps(meta)}


def optimize(
    records: Sequence[CaptionRecord | GroundingRecord | ShardRecord],
    output_dir: str,
    num_workers: int = 1,
    max_side: int | None = None,
    chunk_bytes: str = "64MB",
) -> Counter:
    """Write `records` as litdata chunks into `output_dir` (replaced if it exists); returns the skips by
    reason. litdata switches multiprocessing to spawn for the rest of the process."""
    from litdata import optimize as litdata_optimize

    if not records:
        raise ValueError("nothing to optimize: no usable samples in the input")
    skip_dir = tempfile.mkdtemp(prefix="vlp-optimize-skips-")
    try:
        litdata_optimize(
            fn=functools.partial(encode_sample, max_side=max_side, skip_dir=skip_dir),
            inputs=list(records),
            output_dir=str(output_dir),
            num_workers=max(1, num_workers),
            chunk_bytes=chunk_bytes,
            mode="overwrite",
            verbose=False,
        )
        skipped: Counter = Counter()
        for log in Path(skip_dir).glob("*.txt"):
            skipped.update(log.read_text().split())
        return skipped
    finally:
        shutil.rmtree(skip_dir, ignore_errors=True)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # what optimize's `save_pretrained` writes


def open_stream(input_dir: str, storage_options: dict | None, cache_dir: str | None) -> StreamingDataset:
    """litdata's reader of a chunk folder or of any URL litdata supports (`s3://`, `gs://`, `azure://`, ...):
    a remote index and the chunks read are cached under `cache_dir` (litdata's default when None). A custom
    S3 endpoint comes from `storage_options` (`{"endpoint_url": ...}`, passed to boto3's client) or boto3's
    own environment (`AWS_ENDPOINT_URL`)."""
    if "://" not in input_dir and not (Path(input_dir) / "index.json").is_file():
        raise FileNotFoundError(f"not a litdata chunk folder (no index.json): {input_dir}")
    from litdata import StreamingDataset

    return StreamingDataset(input_dir, cache_dir=cache_dir, storage_options=storage_options)


class ChunkRecords(Sequence):
    """The records of a chunk folder or URL, read on access through litdata's `StreamingDataset` (random
    access by global index, so the data module's sampler decides order and sharding). The reader is
    reopened by whichever process reads (never pickled, and reopened in a forked loader worker)."""

    def __init__(
        self, input_dir: str, storage_options: dict | None = None, cache_dir: str | None = None
    ) -> None:
        self.input_dir, self.storage_options, self.cache_dir = input_dir, storage_options, cache_dir
        self._stream, self._pid = open_stream(input_dir, storage_options, cache_dir), os.getpid()
        # every sample of every chunk (StreamingDataset's own len is this rank's share under DDP)
        self.length = sum(end - start for start, end in self._stream.region_of_interest)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_stream": None, "_pid": None}

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int) -> dict:
        """The raw chunk sample: `image` bytes and the parsed `meta`."""
        if self._stream is None or self._pid != os.getpid():
            self._stream = open_stream(self.input_dir, self.storage_options, self.cache_dir)
            self._pid = os.getpid()
        sample = self._stream[index]
        return {"image": bytes(sample["image"]), **json.loads(sample["meta"])}

    def __getitem__(self, index: int) -> CaptionRecord | GroundingRecord:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples in {self.input_dir}")
        sample = self.sample(index)
        if "box" in sample:
            return GroundingRecord(
                sample["image"], sample["image_id"], tuple(sample["captions"]), tuple(sample["box"])
            )
        return CaptionRecord(sample["image"], sample["image_id"], tuple(sample["captions"]))

    def saved_tokenizer(self) -> str:
        """The local folder of the vocabulary `optimize` saved beside the chunks; for a URL its files are
        fetched with litdata's downloader for that URL into litdata's cache of the index (as file objects:
        litdata's obstore route for whole files refuses plain-http endpoints)."""
        if "://" not in self.input_dir:
            return str(Path(self.input_dir) / TOKENIZER_FOLDER)
        from litdata.streaming.downloader import get_downloader

        local = Path(self._stream.input_dir.path) / TOKENIZER_FOLDER
        local.mkdir(parents=True, exist_ok=True)
        downloader = get_downloader(self.input_dir, str(local.parent), [], self.storage_options)
        for name in TOKENIZER_FILES:
            buffer = io.BytesIO()
            url = f"{self.input_dir.rstrip('/')}/{TOKENIZER_FOLDER}/{name}"
            downloader.download_fileobj(url, buffer)
            if not buffer.getvalue():
                raise FileNotFoundError(
                    f"could not read {url}; set the source's `tokenizer` to a local folder"
                )
            (local / name).write_bytes(buffer.getvalue())
        return str(local)


class StreamingSource(CaptionSource):
    """Chunk folders written by `vlp data optimize`, one per split (`input_dir` trains), local or at any
    URL litdata reads (`s3://bucket/prefix`, ...), with litdata's `storage_options` (e.g. `{endpoint_url:
    ...}` for an S3-compatible store; boto3's `AWS_ENDPOINT_URL` works too) and `cache_dir` for what it
    downloads.

    Grounding chunks (written from RefCOCO-style input) come out with `boxes` and phrases. `tokenizer`
    None loads the vocabulary `optimize` saved beside the training chunks. Other arguments as
    `CaptionSource`; the order is the data module's seeded, rank-sharded, resumable shuffle.
    """

    def __init__(
        self,
        input_dir: str | None = None,
        val_input_dir: str | None = None,
        test_input_dir: str | None = None,
        image_size: int = 224,
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        crop_scale: tuple[float, float] = (0.5, 1.0),
        flip: bool = True,
        max_text_len: int = 40,
        tokenizer: str | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        max_pixels: int = MAX_IMAGE_PIXELS,
        background: tuple[int, int, int] = (255, 255, 255),
        storage_options: dict | None = None,
        cache_dir: str | None = None,
    ) -> None:
        if input_dir is None:
            raise ValueError(
                "input_dir is required (e.g. --data.input_dir DIR written by `vlp data optimize`)"
            )
        self.records = {
            split: None if folder is None else ChunkRecords(folder, storage_options, cache_dir)
            for split, folder in zip(SPLITS, (input_dir, val_input_dir, test_input_dir), strict=True)
        }
        self.configure_loading(
            image_size,
            mean,
            std,
            crop_scale,
            flip,
            max_text_len,
            batch_size,
            num_workers,
            seed,
            max_pixels,
            background,
        )
        self.tokenizer = load_tokenizer(tokenizer or self.records["train"].saved_tokenizer())
        self.dataset_class = (
            GroundingDataset if isinstance(self.records["train"][0], GroundingRecord) else CaptionDataset
        )
