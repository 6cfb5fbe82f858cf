"""Decoding every awkward image the wild throws at a loader: each one converts correctly or is a counted skip."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vlp.datamodules.images import (
    ImageTransform,
    SkipSample,
    check_box,
    check_caption,
    collate_skips,
    decode_image,
    first_usable,
    random_crop,
    swap_left_right,
)

from .conftest import huge_png_header, photo


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def skip_reason(source, **kwargs) -> str:
    with pytest.raises(SkipSample) as caught:
        decode_image(source, **kwargs)
    return caught.value.reason


def test_unusable_files_are_skips_with_their_reason(tmp_path: Path):
    jpeg = encoded(photo(64, 48), "JPEG")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "text.jpg").write_bytes(b"these are not the pixels you are looking for")
    (tmp_path / "bomb.png").write_bytes(huge_png_header(30_000, 30_000))
    assert skip_reason(tmp_path / "missing.jpg") == "missing_file"
    assert skip_reason(tmp_path / "empty.jpg") == "empty_file"
    assert skip_reason(tmp_path / "truncated.jpg") == "truncated_image"
    assert skip_reason(tmp_path / "text.jpg") == "not_an_image"
    assert skip_reason(tmp_path / "bomb.png") == "image_too_large"  # refused from the header, never decoded
    assert skip_reason(jpeg, max_pixels=64 * 48 - 1) == "image_too_large"
    assert decode_image(jpeg, max_pixels=64 * 48).size == (64, 48)


def test_cmyk_jpeg_converts_to_the_same_colours():
    rgb = Image.new("RGB", (16, 16), (200, 40, 30))
    cmyk = Image.open(io.BytesIO(encoded(rgb.convert("CMYK"), "JPEG", quality=100)))
    assert cmyk.mode == "CMYK"
    decoded = np.asarray(decode_image(encoded(rgb.convert("CMYK"), "JPEG", quality=100)), dtype=int)
    assert np.abs(decoded - [200, 40, 30]).max() <= 6


def test_16_bit_png_is_scaled_to_8_bits_not_clipped():
    values = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16)
    png = encoded(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(png)).mode.startswith("I")
    decoded = np.asarray(decode_image(png))
    assert decoded.shape == (1, 4, 3)
    np.testing.assert_array_equal(decoded[0, :, 0], [0, 64, 128, 255])
    np.testing.assert_array_equal(decoded[..., 0], decoded[..., 2])


def test_transparency_is_composited_onto_the_stated_background():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (0, 0, 255, 0)  # fully transparent blue
    rgba[1, :] = (0, 255, 0, 128)  # half green
    background = (10, 20, 30)
    decoded = np.asarray(decode_image(encoded(Image.fromarray(rgba, "RGBA"), "PNG"), background=background))
    alpha = 128 / 255
    np.testing.assert_array_equal(decoded[0, 0], (255, 0, 0))
    np.testing.assert_array_equal(decoded[0, 1], background)
    expected_half = np.array([10 * (1 - alpha), 255 * alpha + 20 * (1 - alpha), 30 * (1 - alpha)])
    assert np.abs(decoded[1, 0] - expected_half).max() <= 1

    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putdata([0, 1])
    png = encoded(palette, "PNG", transparency=1)  # palette index 1 (green) is transparent
    decoded = np.asarray(decode_image(png, background=background))
    np.testing.assert_array_equal(decoded[0], [(255, 0, 0), background])


def test_captions_and_boxes_that_cannot_be_used_are_rejected_by_reason():
    assert check_caption("  a dog  ") == "a dog"
    for caption in ("", "   \n\t", None, 3):
        with pytest.raises(SkipSample, match="empty_caption"):
            check_caption(caption)
    assert check_box([10, 5, 20, 10], 40, 30) == (10, 5, 20, 10)
    cases = {
        "box_outside_image": [30, 5, 20, 10],
        "box_zero_area": [10, 5, 0, 10],
        "box_negative": [-3, 5, 20, 10],
        "box_not_finite": [10, float("nan"), 20, 10],
    }
    for reason, box in cases.items():
        with pytest.raises(SkipSample) as caught:
            check_box(box, 40, 30)
        assert caught.value.reason == reason, box
    with pytest.raises(SkipSample, match="box_not_finite"):
        check_box([1, 2, 3], 40, 30)


def test_flip_swaps_left_and_right_as_whole_words():
    assert swap_left_right("Left of the man, right arm; leftover") == "Right of the man, left arm; leftover"


def test_eval_transform_resizes_image_and_box_together():
    image = photo(80, 40)
    transform = ImageTransform(image_size=32, mean=(0.0,) * 3, std=(1.0,) * 3)
    pixels, box, flipped = transform(image, (20.0, 10.0, 40.0, 20.0))
    assert pixels.shape == (3, 32, 32) and not flipped
    assert 0.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0
    torch.testing.assert_close(box, torch.tensor([0.5, 0.5, 0.5, 0.5]))
    normalised, _, _ = ImageTransform(image_size=32)(image)
    torch.testing.assert_close(normalised, pixels * 2 - 1)


@pytest.mark.parametrize("seed", range(20))
def test_training_crop_keeps_the_box_and_flip_mirrors_it(seed: int):
    """A bright square marks the box; after crop + resize + flip, the returned box still covers it."""
    canvas = np.zeros((60, 90, 3), dtype=np.uint8)
    x, y, w, h = 50, 12, 16, 20
    canvas[y : y + h, x : x + w] = 255
    transform = ImageTransform(image_size=48, mean=(0.0,) * 3, std=(1.0,) * 3, crop_scale=(0.1, 0.5))
    generator = torch.Generator().manual_seed(seed)
    pixels, box, flipped = transform(Image.fromarray(canvas), (x, y, w, h), generator)
    bright = pixels[0] > 0.5
    rows, cols = bright.any(1).nonzero().flatten(), bright.any(0).nonzero().flatten()
    measured = (
        torch.tensor(
            [
                (cols[0] + cols[-1] + 1) / 2,
                (rows[0] + rows[-1] + 1) / 2,
                cols[-1] - cols[0] + 1,
                rows[-1] - rows[0] + 1,
            ]
        )
        / 48
    )
    torch.testing.assert_close(box, measured.float(), atol=2.5 / 48, rtol=0)
    again = transform(Image.fromarray(canvas), (x, y, w, h), torch.Generator().manual_seed(seed))
    torch.testing.assert_close(again[0], pixels)  # the draw depends only on the generator


def test_random_crop_draws_areas_within_the_scale_range():
    generator = torch.Generator().manual_seed(0)
    crops = [random_crop(100, 80, (0.3, 0.6), (0.75, 4 / 3), generator) for _ in range(200)]
    fractions = np.array([c.width * c.height / 8000 for c in crops])
    assert 0.28 <= fractions.min() and fractions.max() <= 0.62
    assert all(0 <= c.left <= 100 - c.width and 0 <= c.top <= 80 - c.height for c in crops)


class FlakyFiles(torch.utils.data.Dataset):
    """Odd indices are broken files; loading one must neither kill a worker nor lose the count."""

    def __init__(self, folder: Path) -> None:
        self.paths = []
        for index in range(16):
            path = folder / f"{index}.jpg"
            path.write_bytes(encoded(photo(8, 8, seed=index), "JPEG") if index % 2 == 0 else b"broken")
            self.paths.append(path)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> dict:
        return {"index": index, "size": decode_image(self.paths[index]).size}

    def __getitem__(self, index: int) -> dict:
        return first_usable(self.load, index, len(self), "flaky")


def test_bad_files_in_workers_become_counted_substitutes(tmp_path: Path):
    loader = DataLoader(
        FlakyFiles(tmp_path),
        batch_size=4,
        num_workers=2,
        collate_fn=lambda items: (items, collate_skips(items)),
    )
    indices, skipped = [], {}
    for items, counts in loader:
        indices += [item["index"] for item in items]
        for reason, n in counts.items():
            skipped[reason] = skipped.get(reason, 0) + n
    assert skipped == {"not_an_image": 8}
    assert indices == [(i + i % 2) % 16 for i in range(16)]  # each broken index replaced by the next


def test_a_run_of_bad_samples_is_an_error_naming_the_source():
    def load(index: int) -> dict:
        raise SkipSample("not_an_image", str(index))

    with pytest.raises(RuntimeError, match=r"my-source: 5 unusable samples in a row .*not_an_image"):
        first_usable(load, 0, 5, "my-source")
