"""Reading and writing images and label masks in the datasets' real on-disk formats.

Images are decoded with OpenCV (libjpeg-turbo, about twice as fast as PIL here) and returned as RGB.
Masks are read with PIL because VOC masks are *palette* PNGs: the stored index is the class, and the
palette colours must never be involved (OpenCV expands palettes to BGR). Cityscapes `labelIds` are
8-bit greyscale PNGs, read the same way.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from deeplab_lit.errors import UserError
from deeplab_lit.palette import VOC_PALETTE

IGNORE_INDEX = 255


def read_image(path: str | Path) -> np.ndarray:
    """An RGB uint8 H x W x 3 array; a missing, unreadable or truncated file raises UserError naming it."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise UserError(f"cannot read image {path}: {error.strerror or error}") from None
    # OpenCV returns None for empty, corrupt and truncated JPEG/PNG data instead of a grey-filled
    # image; IMREAD_COLOR_RGB has libjpeg write RGB directly, saving a BGR->RGB pass.
    image = cv2.imdecode(data, cv2.IMREAD_COLOR_RGB) if data.size else None
    if image is None:
        raise UserError(f"image {path} is unreadable or truncated; re-extract or re-download it")
    return image


def read_index_png(path: str | Path) -> np.ndarray:
    """A uint8 H x W array of the stored indices of a palette (P) or greyscale (L) PNG."""
    try:
        with Image.open(path) as png:
            if png.mode not in ("P", "L"):
                raise UserError(
                    f"mask {path} is a {png.mode} image; label masks must be palette or greyscale PNGs "
                    "whose pixel values are class indices"
                )
            mask = np.asarray(png)
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"mask {path} does not exist") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise UserError(f"mask {path} is unreadable or truncated ({error}); re-extract or re-download it") from None
    return mask


def write_index_png(path: str | Path, mask: np.ndarray, palette: np.ndarray = VOC_PALETTE) -> None:
    """Write a uint8 class map as a palette PNG, the format of VOC's SegmentationClass."""
    png = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="P")
    png.putpalette(palette.reshape(-1).tolist())
    png.save(path, format="PNG")


def valid_value_table(num_classes: int) -> np.ndarray:
    """A 256-entry bool table: True for the class indices 0..num_classes-1 and for 255 (ignore)."""
    table = np.zeros(256, dtype=bool)
    table[:num_classes] = True
    table[IGNORE_INDEX] = True
    return table


def check_mask_values(mask: np.ndarray, valid: np.ndarray, path: str | Path, expected: str) -> None:
    """Raise UserError naming the file and the first value for which `valid` is False.

    cv2.LUT + countNonZero is ~10x faster than np.bincount on a VOC mask; the count is only taken
    to write the message.
    """
    if cv2.countNonZero(cv2.LUT(mask, (~valid).astype(np.uint8))) == 0:
        return
    counts = np.bincount(mask.reshape(-1), minlength=256)
    bad = np.flatnonzero((counts > 0) & ~valid)
    raise UserError(f"mask {path} holds value {int(bad[0])} ({int(counts[bad[0]])} pixels); expected {expected}")
