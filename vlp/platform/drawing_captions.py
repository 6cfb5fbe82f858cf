"""Pictures for TensorBoard: each image upscaled, with lines of text (e.g. generated vs reference caption)
drawn under it in PIL's default font."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

BACKGROUND = (0, 0, 0)
TEXT_COLOURS = ((255, 230, 80), (200, 200, 200))  # first text (e.g. generated), then the others
MARGIN = 4


def wrap_text(text: str, draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap so that each line is at most `width` pixels wide (a longer word gets its own line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def images_with_captions(
    images: Tensor, texts: Sequence[Sequence[str]], size: int = 192, max_lines: int = 4
) -> Tensor:
    """images [N, 3, H, W] in [-1, 1] + N lists of K strings -> uint8 [N, 3, H', size] panels.

    Every panel has the same height: the image upscaled to size x size (nearest neighbour), then each of
    its K strings wrapped to the panel width, cut to `max_lines` lines (the last ending in "...").
    """
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise ValueError(f"images must be [N, 3, H, W] with N >= 1, got {tuple(images.shape)}")
    if len(texts) != images.shape[0] or len({len(t) for t in texts}) > 1:
        raise ValueError(
            f"texts must hold one list of the same number of strings per image ({images.shape[0]}), "
            f"got lengths {[len(t) for t in texts]}"
        )
    if size < 16 or max_lines < 1:
        raise ValueError(f"size must be >= 16 and max_lines >= 1, got size={size}, max_lines={max_lines}")
    font = ImageFont.load_default()
    line_height = font.getbbox("Ag")[3] + 2
    height = size + MARGIN + len(texts[0]) * (max_lines * line_height + MARGIN)
    pixels = ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    panels = []
    for image, strings in zip(pixels, texts, strict=True):
        panel = Image.new("RGB", (size, height), BACKGROUND)
        picture = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((size, size), Image.NEAREST)
        panel.paste(picture, (0, 0))
        draw = ImageDraw.Draw(panel)
        top = size + MARGIN
        for index, text in enumerate(strings):
            lines = wrap_text(text, draw, font, size - 2 * MARGIN)
            if len(lines) > max_lines:
                lines = [*lines[: max_lines - 1], f"{lines[max_lines - 1]} ..."]
            colour = TEXT_COLOURS[min(index, 1)]
            for row, line in enumerate(lines):
                draw.text((MARGIN, top + row * line_height), line, fill=colour, font=font)
            top += max_lines * line_height + MARGIN
        panels.append(torch.from_numpy(np.array(panel)).permute(2, 0, 1))
    return torch.stack(panels)
