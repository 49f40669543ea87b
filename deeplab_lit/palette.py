"""The PASCAL VOC colour map: class i's colour from the bits of i (the devkit's `labelcolormap`).

In the package root so that the datamodules (palette PNGs), the records (saved predictions) and the
report (figures) share one definition without importing each other."""
from __future__ import annotations

import numpy as np


def voc_palette(num_colors: int = 256) -> np.ndarray:
    """num_colors x 3 uint8."""
    palette = np.zeros((num_colors, 3), dtype=np.uint8)
    for index in range(num_colors):
        value, r, g, b = index, 0, 0, 0
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette[index] = (r, g, b)
    return palette


VOC_PALETTE = voc_palette()
