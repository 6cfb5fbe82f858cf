"""Real image files for the file-based sources, written with Pillow into a temporary folder."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def photo(width: int = 40, height: int = 30, seed: int = 0) -> Image.Image:
    """A smooth random RGB image (gradients + noise), so JPEG round trips stay close."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 8, base.shape) + rng.integers(0, 60, 3), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def write_jpeg(path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    photo(**kwargs).save(path, "JPEG", quality=90)
    return path


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's signature), with valid CRCs."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def write_coco(path: Path, images: dict[int, str], captions: list[tuple[int, str]]) -> Path:
    data = {
        "images": [{"id": i, "file_name": name} for i, name in images.items()],
        "annotations": [{"id": n, "image_id": i, "caption": c} for n, (i, c) in enumerate(captions)],
    }
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def coco_folder(tmp_path: Path) -> Path:
    """24 train + 8 val JPEGs with 2-3 captions each; captions name the image's index and a side."""
    root = tmp_path / "images"
    for split, count in (("train", 24), ("val", 8)):
        images, captions = {}, []
        for index in range(count):
            image_id = 1000 * (split == "val") + index
            name = f"{split}2017/{image_id:06d}.jpg"
            write_jpeg(root / name, seed=image_id, width=40 + index, height=32)
            images[image_id] = name
            captions += [(image_id, f"picture {index} on the left"), (image_id, f"another view {index}")]
            if index % 2:
                captions.append((image_id, f"a third caption for {index}"))
        write_coco(tmp_path / f"captions_{split}.json", images, captions)
    return tmp_path
