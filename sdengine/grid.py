"""A contact sheet of a request's images, laid out as the bot lays out its grids."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image


def image_grid(images: Sequence[Image.Image]) -> Image.Image:
    """Images side by side: 1x2 for two, 2x2 for three or four, in reading order (seed order)."""
    columns = 1 if len(images) == 1 else 2
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * width, (i // columns) * height))
    return sheet
