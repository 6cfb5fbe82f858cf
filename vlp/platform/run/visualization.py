"""Pictures for TensorBoard: upscaled images with boxes and text drawn on, and the callback that logs them.

Objectives build the pictures (`validation_images`); `ValidationImages` asks the module for them on the
first batch of every N-th validation run and writes them to each TensorBoard logger. Boxes are the
project's normalised (cx, cy, w, h).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from vlp.platform.boxes import box_cxcywh_to_xyxy
from vlp.platform.run.fonts import text_font

GREEN = (0, 255, 0)
RED = (255, 0, 0)
TEXT_COLOUR = (255, 255, 255)
CAPTION_COLOURS = ((255, 230, 80), (200, 200, 200))  # generated, then references
BAND_COLOUR = (0, 0, 0)
TARGET_SIZE = 192
MAX_IMAGES = 8

Colour = tuple[int, int, int]


def upscale(images: Tensor, size: int = TARGET_SIZE) -> Tensor:
    """[N, 3, H, W] float in [-1, 1] -> uint8 [N, 3, kH, kW], k = max(1, size // max(H, W)), nearest.

    An integer factor keeps every source pixel a sharp k x k square, so small images stay readable.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape [N, 3, H, W], got {tuple(images.shape)}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    factor = max(1, size // max(images.shape[-2:]))
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def to_pil(image: Tensor) -> Image.Image:
    """uint8 [3, H, W] -> RGB PIL image."""
    return Image.fromarray(image.permute(1, 2, 0).cpu().numpy())


def from_pil(image: Image.Image) -> Tensor:
    """RGB PIL image -> uint8 [3, H, W]."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def draw_boxes(image: Image.Image, boxes: Tensor, colours: Sequence[Colour], width: int = 2) -> None:
    """Draw normalised cxcywh `boxes` [K, 4] onto `image` in place, box k in `colours[k]`.

    The outline lies inside the box's pixels; boxes are clipped to the image, and zero-area boxes are
    drawn as a line or a dot so a collapsed prediction is still visible.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape [K, 4], got {tuple(boxes.shape)}")
    if len(colours) != boxes.shape[0]:
        raise ValueError(f"need one colour per box: {boxes.shape[0]} boxes, {len(colours)} colours")
    w, h = image.size
    draw = ImageDraw.Draw(image)
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    corners = (box_cxcywh_to_xyxy(boxes.detach().float().cpu()) * scale).round().long().tolist()
    for (x0, y0, x1, y1), colour in zip(corners, colours, strict=True):
        x0, y0 = min(max(x0, 0), w - 1), min(max(y0, 0), h - 1)
        x1, y1 = min(max(x1 - 1, x0), w - 1), min(max(y1 - 1, y0), h - 1)
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int, lines: int) -> list[str]:
    """Greedy word wrap into at most `lines` lines of at most `width` px; cut text ends in '...'."""
    out: list[str] = []
    words = text.split()
    while words and len(out) < lines:
        line = words.pop(0)
        while words and font.getlength(f"{line} {words[0]}") <= width:
            line = f"{line} {words.pop(0)}"
        out.append(line)
    if words and out:
        last = out[-1]
        while last and font.getlength(f"{last}...") > width:
            last = last[:-1]
        out[-1] = f"{last}..."
    return out


def draw_text(image: Image.Image, text: str, lines: int = 2, colour: Colour = TEXT_COLOUR) -> Image.Image:
    """`image` with a black band of `lines` text lines under it holding `text` (word-wrapped, white).

    A band below the picture never hides the objects the text is about; its height depends only on
    `lines` and the image width, so pictures of one batch stack into one tensor.
    """
    if lines < 1:
        raise ValueError(f"lines must be >= 1, got {lines}")
    font = text_font()
    line_height = font.getbbox("Ag")[3] + 2
    w, h = image.size
    out = Image.new("RGB", (w, h + lines * line_height + 4), BAND_COLOUR)
    out.paste(image, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(_wrap(text, font, w - 4, lines)):
        draw.text((2, h + 2 + i * line_height), line, fill=colour, font=font)
    return out


def annotate_captions(
    images: Tensor,
    texts: Sequence[Sequence[str]],
    size: int = TARGET_SIZE,
    lines: int = 4,
    max_images: int = MAX_IMAGES,
) -> Tensor:
    """Upscaled images [N, 3, H, W] in [-1, 1] with their K strings in bands underneath (the first, e.g. the
    generated caption, in yellow; the others, e.g. the reference, in grey) -> uint8 [min(N, max_images), 3, H', W']."""
    n = min(images.shape[0], max_images)
    if len(texts) < n or len({len(t) for t in texts[:n]}) > 1:
        raise ValueError(
            f"need the same number of strings for each of {n} images, got {[len(t) for t in texts]}"
        )
    pictures = []
    for image, strings in zip(upscale(images[:n], size), texts, strict=False):
        picture = to_pil(image)
        for k, text in enumerate(strings):
            picture = draw_text(picture, text, lines, CAPTION_COLOURS[min(k, 1)])
        pictures.append(from_pil(picture))
    return torch.stack(pictures)


def annotate_boxes(
    images: Tensor,
    texts: Sequence[str],
    target_boxes: Tensor,
    pred_boxes: Tensor,
    size: int = TARGET_SIZE,
    max_images: int = MAX_IMAGES,
) -> Tensor:
    """Upscaled images [N, 3, H, W] in [-1, 1] with the target box in green, the prediction in red and the
    text underneath -> uint8 [min(N, max_images), 3, H', W'] (cxcywh boxes [N, 4])."""
    n = min(images.shape[0], max_images)
    if len(texts) < n or target_boxes.shape[0] < n or pred_boxes.shape[0] < n:
        raise ValueError(
            f"need a text, a target and a predicted box per image: {images.shape[0]} images, {len(texts)} "
            f"texts, {target_boxes.shape[0]} targets, {pred_boxes.shape[0]} predictions"
        )
    pictures = []
    for i, image in enumerate(upscale(images[:n], size)):
        picture = to_pil(image)
        draw_boxes(picture, torch.stack([target_boxes[i], pred_boxes[i]]), [GREEN, RED])
        pictures.append(from_pil(draw_text(picture, texts[i])))
    return torch.stack(pictures)


class ValidationImages(Callback):
    """Logs the module's pictures (tag -> uint8 [N, 3, H, W]) to every TensorBoard logger, from the first
    batch of the first val loader of every `every_n_validations`-th validation run.

    The sanity check does not count. The module draws them inside its `validation_step` when asked
    (`pictures_requested`: how many samples), so they run where the strategy runs the network: a sharded
    model (ZeRO-3, FSDP2) has its parameters gathered there on every rank, and each rank draws its own
    batch's; only rank zero writes, as TensorBoardLogger's experiment is a no-op elsewhere.
    """

    def __init__(self, every_n_validations: int = 1, max_images: int = MAX_IMAGES) -> None:
        if every_n_validations < 1:
            raise ValueError(f"every_n_validations must be >= 1, got {every_n_validations}")
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        self.every_n_validations = every_n_validations
        self.max_images = max_images
        self.validations = 0

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validations += 1

    def _loggers(self, trainer: Trainer) -> list[TensorBoardLogger]:
        return [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]

    def on_validation_batch_start(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        due = self.validations % self.every_n_validations == 0 and batch_idx == 0 and dataloader_idx == 0
        if due and not trainer.sanity_checking and self._loggers(trainer) and hasattr(pl_module, "pictures"):
            pl_module.pictures_requested = self.max_images

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not getattr(pl_module, "pictures_requested", 0):
            return
        pl_module.pictures_requested = 0
        images = outputs.get("pictures", {}) if isinstance(outputs, dict) else {}
        for tag, pictures in images.items():
            pictures = pictures[: self.max_images].detach().cpu()
            for logger in self._loggers(trainer):
                logger.experiment.add_images(tag, pictures, trainer.global_step, dataformats="NCHW")

    def state_dict(self) -> dict[str, int]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.validations = int(state_dict["validations"])
