"""The font pictures are drawn with: DejaVu Sans, the TrueType font matplotlib ships (Latin, Greek, Cyrillic
and more), so captions such as "Côte d'Ivoire" draw their letters; Pillow's built-in font lacks most
accented letters and draws a box for each."""

from __future__ import annotations

import functools
from importlib.util import find_spec
from pathlib import Path

from PIL import ImageFont


@functools.cache
def text_font(size: int = 11) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans at `size` px, found inside the matplotlib package without importing it; Pillow's default
    font where matplotlib is not installed."""
    spec = find_spec("matplotlib")
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if path.is_file():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size)
