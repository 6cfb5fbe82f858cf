"""img2dataset-style WebDataset tar shards as input to `vlp data optimize`: `<key>.jpg|png|webp` with a
`<key>.txt` caption or a `<key>.json` holding `caption`. Members are located once (offset, size), so each
image is later read with one seek, not a scan of the archive."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from vlp.datamodules.images import SkipSample, check_caption

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


@dataclass(frozen=True)
class TarMember:
    """Where an image's bytes lie inside a shard."""

    shard: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.shard, "rb") as file:
            file.seek(self.offset)
            return file.read(self.size)


@dataclass(frozen=True)
class ShardRecord:
    member: TarMember
    image_id: int
    captions: tuple[str, ...]
    key: str


def shard_paths(path: str | Path) -> list[Path]:
    """A .tar file, or every .tar in a folder (sorted); none is a FileNotFoundError naming the path."""
    path = Path(path)
    shards = sorted(path.glob("*.tar")) if path.is_dir() else [path] if path.is_file() else []
    if not shards:
        raise FileNotFoundError(f"no .tar shards at {path}")
    return shards


def member_caption(data: bytes, extension: str) -> object:
    """A `.txt` member's text, or a `.json` member's `caption`; bytes that are not UTF-8 are kept as
    surrogates (`check_caption` counts them as `bad_encoding`), JSON that does not parse is a
    `SkipSample("malformed_json")`, returned to be raised when the key is checked."""
    text = data.decode("utf-8", errors="surrogateescape")
    if extension == ".txt":
        return text
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):
        return SkipSample("malformed_json")
    return parsed.get("caption") if isinstance(parsed, dict) else None


def read_shards(path: str | Path, skipped: Counter) -> list[ShardRecord]:
    """One record per key that has an image and a usable caption; others are counted in `skipped`
    (missing_file: a caption without image; empty_caption: an image without usable caption; bad_encoding:
    a caption that is not UTF-8; malformed_json: a `.json` member that does not parse). A `.txt` caption
    wins over a `.json` one."""
    records = []
    for shard in shard_paths(path):
        images: dict[str, TarMember] = {}
        captions: dict[str, object] = {}
        with tarfile.open(shard) as archive:
            for info in archive:
                if not info.isfile():
                    continue
                key, dot, extension = info.name.rpartition(".")
                extension = dot + extension.lower()
                if extension in IMAGE_EXTENSIONS:
                    images[key] = TarMember(str(shard), info.offset_data, info.size)
                elif extension == ".txt":
                    captions[key] = member_caption(archive.extractfile(info).read(), extension)
                elif extension == ".json":
                    captions.setdefault(key, member_caption(archive.extractfile(info).read(), extension))
        for key in sorted(set(images) | set(captions)):
            if key not in images:
                skipped["missing_file"] += 1
                continue
            try:
                caption = captions.get(key)
                if isinstance(caption, SkipSample):
                    raise caption
                caption = check_caption(caption)
            except SkipSample as skip:
                skipped[skip.reason] += 1
                continue
            records.append(ShardRecord(images[key], len(records), (caption,), f"{shard.name}/{key}"))
    return records
