"""Decoding, transforms and the bad-input policy shared by every real-data source.

The policy, in one place: a sample that cannot be used raises `SkipSample(reason)`; the dataset replaces it
by the next usable one and records the reason in the item, `collate_skips` sums them into the batch
(`batch["skipped"]`), and the data module counts them, logs them and stops the run past `max_bad_fraction`.
A decoding error therefore never reaches (or kills) a data-loader worker, and nothing is dropped silently.
"""

from __future__ import annotations

import io
import math
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

# Pillow's own decompression-bomb limit; anything larger is refused from the header, before decoding
MAX_IMAGE_PIXELS = 89_478_485
MAX_CONSECUTIVE_SKIPS = 64


class SkipSample(Exception):
    """A sample that cannot be used; `reason` is the counter it lands in (`data/skipped/<reason>`)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def open_image(source: str | Path | bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open and fully decode an image file or encoded bytes; every failure is a `SkipSample`.

    Reasons: missing_file, unreadable_file, empty_file, not_an_image, image_too_large (width x height > max_pixels, read
    from the header, so a decompression bomb is never decoded), truncated_image (or otherwise undecodable).
    """
    if isinstance(source, bytes):
        data = source
        name = "<bytes>"
    else:
        name = str(source)
        data = read_image_file(source)
    if not data:
        raise SkipSample("empty_file", name)
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as error:
        raise SkipSample("not_an_image", name) from error
    except Image.DecompressionBombError as error:
        raise SkipSample("image_too_large", name) from error
    except (OSError, SyntaxError, ValueError) as error:
        raise SkipSample("truncated_image", f"{name}: {error}") from error
    width, height = image.size
    if width * height > max_pixels:
        raise SkipSample("image_too_large", f"{name} is {width}x{height}")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise SkipSample("truncated_image", f"{name}: {error}") from error
    return image


def read_image_file(path: str | Path) -> bytes:
    """A file's bytes; a missing file (or a folder) is `missing_file`, one that cannot be read
    (permissions, an I/O error) `unreadable_file`."""
    try:
        return Path(path).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as error:
        raise SkipSample("missing_file", str(path)) from error
    except OSError as error:
        raise SkipSample("unreadable_file", f"{path}: {error}") from error


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: CMYK through Pillow, 16-bit grey scaled (not clipped) to 8 bits, and
    transparency (RGBA, LA, palette with a transparent index) composited onto `background`."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image, dtype=np.float64)
        scale = 65535.0 if image.mode != "I" or values.max() > 255 else 255.0
        grey = np.clip(np.rint(values * (255.0 / scale)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "F":
        grey = np.clip(np.rint(np.asarray(image) * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info or image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(
    source: str | Path | bytes,
    max_pixels: int = MAX_IMAGE_PIXELS,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """`open_image` then `to_rgb`: the one way every source turns a file or bytes into RGB pixels."""
    return to_rgb(open_image(source, max_pixels), background)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the header only; a missing or unreadable file is a `SkipSample`."""
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError as error:
        raise SkipSample("missing_file", str(path)) from error
    except (UnidentifiedImageError, OSError) as error:
        reason = "empty_file" if Path(path).is_file() and Path(path).stat().st_size == 0 else "not_an_image"
        raise SkipSample(reason, str(path)) from error


def check_caption(text: object) -> str:
    """The caption stripped; the one text rule of every reader (training and `vlp data inspect` alike).

    Reasons: empty_caption (not text, or nothing but whitespace, control and format characters: it would
    tokenize to [CLS] [SEP]); bad_encoding (a lone surrogate such as `\\ud800`, which no UTF-8 codec,
    tokenizer or log writer accepts, or undecodable bytes kept by a CSV reader).
    """
    if not isinstance(text, str) or not text.strip():
        raise SkipSample("empty_caption", repr(text))
    if not is_encodable(text):
        raise SkipSample("bad_encoding", repr(text[:80]))
    if all(char.isspace() or unicodedata.category(char) in ("Cc", "Cf") for char in text):
        raise SkipSample("empty_caption", repr(text[:80]))
    return text.strip()


def is_encodable(text: str) -> bool:
    """Whether `text` is valid Unicode (no lone surrogates): what UTF-8 can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def image_path(image_root: Path, name: str, allow_absolute: bool = False) -> Path:
    """The image file an annotation names, confined to `image_root`; else a `SkipSample`.

    The path is judged as written (normalised, symlinks not followed, so links the root's owner placed
    inside it still work): a relative path whose `..` leave the root, or an absolute path, is
    `outside_root`; `allow_absolute` accepts absolute paths as they are (annotations that hold them).
    A name that is no valid path (a lone surrogate, a NUL byte) is `bad_encoding`.
    """
    if not is_encodable(name) or "\x00" in name:
        raise SkipSample("bad_encoding", repr(name[:200]))
    path = Path(name)
    if path.is_absolute():
        if allow_absolute:
            return path
        raise SkipSample("outside_root", f"{name} is absolute (allow_absolute_paths to accept it)")
    root = os.path.abspath(image_root)
    resolved = os.path.normpath(os.path.join(root, name))
    if os.path.commonpath([root, resolved]) != root:
        raise SkipSample("outside_root", f"{name} leaves {image_root}")
    return image_root / name


def check_box(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """A pixel box [x, y, w, h] that lies in a width x height image, else a `SkipSample`.

    Reasons: box_not_finite (NaN/inf or not 4 numbers), box_negative (x, y, w or h < 0), box_zero_area,
    box_outside_image (extends past the image by more than one pixel of rounding).
    """
    try:
        x, y, w, h = (float(value) for value in box)
    except (TypeError, ValueError) as error:
        raise SkipSample("box_not_finite", repr(box)) from error
    if not all(math.isfinite(value) for value in (x, y, w, h)):
        raise SkipSample("box_not_finite", repr(box))
    if min(x, y, w, h) < 0:
        raise SkipSample("box_negative", repr(box))
    if w == 0 or h == 0:
        raise SkipSample("box_zero_area", repr(box))
    if x + w > width + 1 or y + h > height + 1:
        raise SkipSample("box_outside_image", f"{box} in a {width}x{height} image")
    return x, y, min(w, width - x), min(h, height - y)


_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_left_right(text: str) -> str:
    """ "left" <-> "right" (whole words, case kept), so a caption still describes a mirrored image."""

    def swap(match: re.Match) -> str:
        word = match.group(0)
        swapped = "right" if word.lower() == "left" else "left"
        return swapped.capitalize() if word[0].isupper() else swapped

    return _LEFT_RIGHT.sub(swap, text)


@dataclass(frozen=True)
class Crop:
    top: int
    left: int
    height: int
    width: int


def random_crop(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
    keep: tuple[float, float, float, float] | None = None,
) -> Crop:
    """A random-resized-crop window (area fraction in `scale`, aspect in `ratio`) drawn from `generator`.

    With `keep` (a pixel box x, y, w, h) the window is widened to contain the box and placed so it does,
    as grounding needs; without a fitting draw in 10 tries it falls back to the whole image.
    """

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * uniform(*scale)
        aspect = math.exp(uniform(*log_ratio))
        crop_w = round(math.sqrt(target * aspect))
        crop_h = round(math.sqrt(target / aspect))
        if keep is not None:
            crop_w, crop_h = max(crop_w, math.ceil(keep[2])), max(crop_h, math.ceil(keep[3]))
        if not (0 < crop_w <= width and 0 < crop_h <= height):
            continue
        if keep is None:
            left_range, top_range = (0, width - crop_w), (0, height - crop_h)
        else:
            x, y, w, h = keep
            left_range = (max(0, math.ceil(x + w) - crop_w), min(int(x), width - crop_w))
            top_range = (max(0, math.ceil(y + h) - crop_h), min(int(y), height - crop_h))
            if left_range[0] > left_range[1] or top_range[0] > top_range[1]:
                continue
        left = left_range[0] + int(torch.randint(left_range[1] - left_range[0] + 1, (), generator=generator))
        top = top_range[0] + int(torch.randint(top_range[1] - top_range[0] + 1, (), generator=generator))
        return Crop(top, left, crop_h, crop_w)
    return Crop(0, 0, height, width)


@dataclass
class ImageTransform:
    """PIL RGB (+ optional pixel box) -> normalised [3, S, S] float (+ normalised cx, cy, w, h box).

    Training: a random resized crop (one that keeps the box when there is one) and a horizontal flip
    whose text side (`swap_left_right`) the caller applies when `flipped` is returned. Evaluation: a plain
    resize to S x S, so boxes keep their meaning. Random draws come from the caller's generator, so a
    sample's augmentation depends only on (seed, epoch, index), whatever the worker count.
    """

    image_size: int = 224
    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.5, 0.5, 0.5)
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_probability: float = 0.5

    def __call__(
        self,
        image: Image.Image,
        box: tuple[float, float, float, float] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor | None, bool]:
        """(image [3, S, S], box [4] normalised cxcywh or None, flipped). `generator` None = evaluation."""
        pixels = tv_tensors.Image(TF.pil_to_tensor(image))
        height, width = pixels.shape[-2:]
        boxes = None
        if box is not None:
            boxes = tv_tensors.BoundingBoxes(
                torch.tensor([box], dtype=torch.float32), format="XYWH", canvas_size=(height, width)
            )
        size = [self.image_size, self.image_size]
        flipped = False
        if generator is None:
            pixels = TF.resize(pixels, size, antialias=True)
            boxes = None if boxes is None else TF.resize(boxes, size)
        else:
            crop = random_crop(width, height, self.crop_scale, self.crop_ratio, generator, box)
            args = (crop.top, crop.left, crop.height, crop.width, size)
            pixels = TF.resized_crop(pixels, *args, antialias=True)
            boxes = None if boxes is None else TF.resized_crop(boxes, *args)
            flipped = float(torch.rand((), generator=generator)) < self.flip_probability
            if flipped:
                pixels = TF.horizontal_flip(pixels)
                boxes = None if boxes is None else TF.horizontal_flip(boxes)
        normalised = TF.normalize(pixels.float().div_(255.0), list(self.mean), list(self.std))
        box_out = None
        if boxes is not None:
            cxcywh = TF.convert_bounding_box_format(boxes, new_format="CXCYWH").as_subclass(Tensor)[0]
            box_out = (cxcywh / self.image_size).clamp_(0.0, 1.0)
        return normalised.as_subclass(Tensor), box_out, flipped


def first_usable(
    load: Callable[[int], dict], index: int, length: int, name: str, limit: int = MAX_CONSECUTIVE_SKIPS
) -> dict:
    """`load(index)`, or on `SkipSample` the next index's (cyclically); the item's `skipped` lists the
    reasons it stepped over. More than `limit` bad samples in a row is an error naming the source."""
    skipped: list[str] = []
    for offset in range(min(limit, length)):
        try:
            item = load((index + offset) % length)
        except SkipSample as skip:
            skipped.append(skip.reason)
            continue
        item["skipped"] = skipped
        return item
    raise RuntimeError(
        f"{name}: {len(skipped)} unusable samples in a row from index {index} "
        f"({dict(Counter(skipped))}); check the data with `vlp data inspect`"
    )


def collate_skips(items: Sequence[dict]) -> dict[str, int]:
    """Reasons -> counts over a batch's items (what `first_usable` stepped over)."""
    return dict(Counter(reason for item in items for reason in item.get("skipped", ())))
