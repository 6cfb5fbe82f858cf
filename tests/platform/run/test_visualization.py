"""Pictures for TensorBoard: nearest upscaling, box borders in the right colour and place, the phrase band,
and the ValidationImages callback writing image summaries into the event file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vlp.datamodules.multitask import MultiTaskDataModule
from vlp.datamodules.shapes import ShapesSource
from vlp.platform.run.visualization import (
    BAND_COLOUR,
    GREEN,
    RED,
    ValidationImages,
    annotate_boxes,
    draw_boxes,
    draw_text,
    from_pil,
    to_pil,
    upscale,
)
from vlp.tasks.grounding import GroundingObjective


def test_upscale_maps_minus_one_one_to_uint8_and_repeats_pixels():
    images = torch.tensor([[[[-1.0, 1.0], [0.0, 2.0]]]]).expand(1, 3, 2, 2)
    out = upscale(images, size=6)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 6, 6)
    assert out[0, 0, :3, :3].eq(0).all() and out[0, 0, :3, 3:].eq(255).all()
    assert out[0, 0, 3:, :3].eq(128).all() and out[0, 0, 3:, 3:].eq(255).all()  # 0 -> 127.5 -> 128; 2 clamps
    assert upscale(torch.zeros(2, 3, 64, 64)).shape == (2, 3, 192, 192)
    assert upscale(torch.zeros(1, 3, 224, 224)).shape == (1, 3, 224, 224)  # never shrinks


def test_upscale_rejects_non_rgb_batches():
    with pytest.raises(ValueError, match="images"):
        upscale(torch.zeros(3, 8, 8))


def test_pil_round_trip_keeps_pixels():
    image = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    assert torch.equal(from_pil(to_pil(image)), image)


def test_draw_boxes_puts_each_colour_on_its_box_border():
    picture = to_pil(torch.zeros(3, 100, 100, dtype=torch.uint8))
    target = torch.tensor([[0.3, 0.3, 0.2, 0.2]])  # pixels 20..39
    pred = torch.tensor([[0.7, 0.6, 0.2, 0.4]])  # x 60..79, y 40..79
    draw_boxes(picture, torch.cat([target, pred]), [GREEN, RED], width=2)
    pixels = from_pil(picture)

    def colour(x: int, y: int) -> tuple[int, ...]:
        return tuple(pixels[:, y, x].tolist())

    for x, y in [(20, 30), (21, 30), (39, 30), (30, 20), (30, 39), (20, 20), (39, 39)]:
        assert colour(x, y) == GREEN, (x, y)
    for x, y in [(60, 60), (79, 60), (70, 40), (70, 79), (61, 41)]:
        assert colour(x, y) == RED, (x, y)
    for x, y in [(30, 30), (19, 30), (40, 30), (22, 30), (70, 60), (59, 60), (80, 60), (5, 5)]:
        assert colour(x, y) == (0, 0, 0), (x, y)  # inside, outside and beyond the 2 px borders


def test_draw_boxes_draws_degenerate_and_out_of_image_boxes():
    picture = to_pil(torch.zeros(3, 50, 50, dtype=torch.uint8))
    boxes = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.2, -0.3, 0.3, 0.3]])  # a point; a box off the corner
    draw_boxes(picture, boxes, [RED, GREEN])
    pixels = from_pil(picture)
    assert tuple(pixels[:, 25, 25].tolist()) == RED
    assert tuple(pixels[:, 0, 49].tolist()) == GREEN
    with pytest.raises(ValueError, match="one colour per box"):
        draw_boxes(picture, boxes, [RED])


def test_draw_text_adds_a_band_with_the_text_under_the_image():
    image = to_pil(torch.full((3, 40, 192), 77, dtype=torch.uint8))
    short = from_pil(draw_text(image, "the blue square"))
    long = from_pil(draw_text(image, "the large blue square in the top left " * 5))
    assert short.shape == long.shape and short.shape[1] > 40 and short.shape[2] == 192
    assert short[:, :40].eq(77).all()  # the picture itself is untouched
    band = short[:, 40:]
    assert band.max() > 200  # white (antialiased) letters
    assert band.eq(torch.tensor(BAND_COLOUR, dtype=torch.uint8)[:, None, None]).all(0).float().mean() > 0.5
    with pytest.raises(ValueError, match="lines"):
        draw_text(image, "x", lines=0)


def test_annotate_boxes_caps_the_count_and_stacks_equal_sizes():
    images = torch.zeros(10, 3, 32, 32)
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5]]).expand(10, 4)
    out = annotate_boxes(images, ["the red circle"] * 10, boxes, boxes * 0.5)
    assert out.dtype == torch.uint8 and out.shape[:2] == (8, 3) and out.shape[3] == 192
    with pytest.raises(ValueError, match="text"):
        annotate_boxes(images, ["one"], boxes, boxes)


def test_validation_images_rejects_bad_arguments():
    with pytest.raises(ValueError, match="every_n_validations"):
        ValidationImages(every_n_validations=0)
    with pytest.raises(ValueError, match="max_images"):
        ValidationImages(max_images=0)


def run_fit(tmp_path: Path, backbone, logger, callback: ValidationImages, steps: int = 6) -> Trainer:
    """`steps` training steps with validation after every 2nd step, plus the sanity check."""
    source = ShapesSource(num_train=64, num_val=16, num_test=16, batch_size=8, image_size=32)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
        val_check_interval=2,
        limit_val_batches=2,
        num_sanity_val_steps=1,
        logger=logger,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(GroundingObjective(backbone), datamodule=MultiTaskDataModule(sources={"shapes": source}))
    return trainer


def test_callback_writes_grounding_pictures_every_nth_validation(tmp_path, backbone):
    logger = TensorBoardLogger(tmp_path, name="pictures")
    callback = ValidationImages(every_n_validations=2, max_images=3)
    run_fit(tmp_path, backbone, logger, callback)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert "val/grounding/boxes" in events.Tags()["images"]
    pictures = events.Images("val/grounding/boxes")
    assert [p.step for p in pictures] == [4]  # validations at steps 2, 4, 6; sanity check skipped
    assert pictures[0].width == 3 * 192 and pictures[0].height > 192  # grid of 3, phrase band below
    assert callback.state_dict() == {"validations": 3}


def test_callback_is_a_no_op_without_a_tensorboard_logger(tmp_path, backbone, monkeypatch):
    calls = []
    monkeypatch.setattr(GroundingObjective, "pictures", lambda self, batch: calls.append(1) or {})
    run_fit(tmp_path, backbone, CSVLogger(tmp_path), ValidationImages(), steps=2)
    assert calls == []


def test_pictures_draw_accented_letters_not_boxes():
    """The text font has glyphs for accented letters: 'ô' is drawn, not the missing-glyph box a CJK
    character (absent from it) is drawn as."""
    from PIL import Image, ImageDraw

    from vlp.platform.run.fonts import text_font

    def drawn(text: str) -> bytes:
        image = Image.new("L", (40, 24))
        ImageDraw.Draw(image).text((2, 2), text, font=text_font(14), fill=255)
        return image.tobytes()

    assert drawn("ô") != drawn("\u4e00") and drawn("ô") != drawn("o")
    assert drawn("\u4e00") == drawn("\u4e01")  # both missing: the same box
