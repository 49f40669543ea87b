"""Augmentation pipelines (albumentations 2.0.8, `strict=True` so a misspelt parameter is an error).

Training follows DeepLab v2/v3: random scale in `data.scale_range`, pad to the crop (image with the
ImageNet mean colour, which is 0 after normalisation; mask with 255 so padding is ignored by the loss),
random crop, horizontal flip. Images stay 8-bit: the float conversion and the mean/std normalisation
run on the device after the transfer (deeplab_lit/preprocessing.py). Evaluation takes the whole image,
unchanged, because padding to a stride multiple belongs to inference.

Scale, pad and crop are one transform, `RandomScaleCrop`, which interpolates only the crop's pixels:
scaling the whole image first (albumentations' RandomScale + PadIfNeeded + RandomCrop) spends most of
its time on pixels the crop then throws away (at crop 321 and scales 0.5-1.5, 54 % of them): on one
core, 0.21 ms instead of 0.51 ms per 500x375 image at crop 321, 0.36 ms instead of about 1.0 ms at 513.

Discrete scales (`data.scale_step`, v3/v3+ rows): TF DeepLab's `get_random_scale` draws uniformly from
`linspace(min, max, int((max - min) / step + 1))` when its `scale_factor_step_size` (0.25 in train.py)
is set, e.g. {0.5, 0.75, ..., 2.0}.
"""
from __future__ import annotations

import math
import random
from typing import Annotated, Any, NamedTuple, Sequence

import albumentations as A
import cv2
import numpy as np
from pydantic import Field

from datamodules.readers import IGNORE_INDEX

from deeplab_lit.preprocessing import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401 (re-exported for the datamodules)
# The mean as an 8-bit RGB colour: what the image is padded with (normalises to ~0).
MEAN_RGB_UINT8 = tuple(round(255 * m) for m in IMAGENET_MEAN)


def discrete_scales(low: float, high: float, step: float) -> list[float]:
    """TF DeepLab's preprocess_utils.get_random_scale: linspace(low, high, int((high - low) / step + 1))."""
    count = int((high - low) / step + 1)
    return [low + (high - low) * i / (count - 1) for i in range(count)] if count > 1 else [low]


class AxisWindow(NamedTuple):
    """How one axis of the crop is made from the source image scaled by s.

    Source pixels [start, stop) are scaled (OpenCV's half-pixel mapping: output pixel m samples source
    position start + (m + 0.5) / s - 0.5); output pixels [skip, skip + length) of that are placed at
    [offset, offset + length) of the crop; the rest of the crop is padding."""

    start: int
    stop: int
    skip: int
    length: int
    offset: int


def axis_window(size: int, scale: float, crop: int, u: float) -> AxisWindow:
    """The window of one axis of `size` pixels for scale `scale`, crop `crop` and a uniform draw u in [0, 1).

    The scaled axis has int(size * scale) pixels (albumentations' RandomScale). If they fit in the crop,
    all of them are taken and centred (PadIfNeeded's "center"). Otherwise the crop starts at scaled
    position q * scale + skip for a source pixel q drawn uniformly among those that keep the crop inside
    the scaled image; skip = ceil((scale - 1) / 2) output pixels when q > 0, so that the first crop
    pixel's source position is at or right of q and its interpolation never reads a pixel outside the
    window (the window's edge would otherwise be replicated where the whole image has a neighbour).
    Crop offsets are hence multiples of `scale` plus `skip` rather than whole scaled pixels: the same
    crops as a random crop of the scaled image, up to a sub-pixel shift."""
    scaled = int(size * scale)
    if scaled <= crop:
        return AxisWindow(0, size, 0, scaled, (crop - scaled) // 2)
    skip_inside = max(0, math.ceil((scale - 1) / 2))
    last = max(0, math.floor((scaled - crop - skip_inside) / scale))  # the largest q > 0 that fits, or 0
    q = int((last + 1) * u)
    skip = skip_inside if q > 0 else 0
    # The last crop pixel samples q + (skip + crop - 0.5) / scale - 0.5; bilinear reads the pixel after it.
    stop = min(size, math.floor(q + (skip + crop - 0.5) / scale - 0.5) + 2)
    return AxisWindow(q, stop, skip, crop, 0)


def scale_crop(
    array: np.ndarray, scale: float, rows: AxisWindow, cols: AxisWindow, crop: int, interpolation: int, fill
) -> np.ndarray:
    """The crop x crop (x channels) output of `array` for the windows `rows` and `cols`."""
    window = array[rows.start : rows.stop, cols.start : cols.stop]
    scaled = cv2.resize(window, None, fx=scale, fy=scale, interpolation=interpolation)
    if scaled.ndim < array.ndim:  # OpenCV drops a trailing channel axis of 1
        scaled = scaled[..., None]
    part = scaled[rows.skip : rows.skip + rows.length, cols.skip : cols.skip + cols.length]
    if rows.length == crop and cols.length == crop:
        return part
    top, left = rows.offset, cols.offset
    bottom, right = crop - rows.length - top, crop - cols.length - left
    padded = cv2.copyMakeBorder(part, top, bottom, left, right, cv2.BORDER_CONSTANT, value=fill)
    return padded[..., None] if padded.ndim < array.ndim else padded


class RandomScaleCrop(A.DualTransform):
    """Scale by a random factor, pad to `crop_size` (centred; image with `fill`, mask with `fill_mask`)
    and take a random crop_size x crop_size crop: RandomScale -> PadIfNeeded -> RandomCrop in one step
    that interpolates only the crop's pixels (see `axis_window` for where the crop may start).

    The factor is uniform in `scale_range`, or one of `scales` when given (TF DeepLab's stepped scales).
    Images are scaled bilinearly, masks with nearest neighbours, both with OpenCV's pixel mapping, so a
    mask pixel labels the image pixel it lies on exactly as after scaling the whole image."""

    class InitSchema(A.DualTransform.InitSchema):
        crop_size: Annotated[int, Field(ge=1)]
        scale_range: tuple[float, float]
        scales: list[float] | None
        fill: tuple[int, int, int]
        fill_mask: int

    def __init__(
        self,
        crop_size: int,
        scale_range: tuple[float, float] = (1.0, 1.0),
        scales: list[float] | None = None,
        fill: tuple[int, int, int] = (0, 0, 0),
        fill_mask: int = IGNORE_INDEX,
        p: float = 1.0,
    ):
        super().__init__(p=p)  # the values are checked once, with the config (datamodules.validate_data_config)
        self.crop_size, self.scale_range, self.scales = crop_size, tuple(scale_range), scales
        self.fill, self.fill_mask = fill, fill_mask

    def get_params(self) -> dict[str, float]:
        if self.scales:
            return {"scale": self.py_random.choice(self.scales)}
        return {"scale": self.py_random.uniform(*self.scale_range)}

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        scale = params["scale"]
        return {
            "rows": axis_window(height, scale, self.crop_size, self.py_random.random()),
            "cols": axis_window(width, scale, self.crop_size, self.py_random.random()),
        }

    def apply(self, img: np.ndarray, scale: float, rows: AxisWindow, cols: AxisWindow, **params) -> np.ndarray:
        return scale_crop(img, scale, rows, cols, self.crop_size, cv2.INTER_LINEAR, self.fill)

    def apply_to_mask(self, mask: np.ndarray, scale: float, rows: AxisWindow, cols: AxisWindow, **params) -> np.ndarray:
        return scale_crop(mask, scale, rows, cols, self.crop_size, cv2.INTER_NEAREST, self.fill_mask)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("crop_size", "scale_range", "scales", "fill", "fill_mask")


def seed_transform(transform: A.Compose, seed: int) -> None:
    """Seed a pipeline with one random stream that its transforms draw from in turn.

    albumentations' `Compose.set_random_seed(seed)` (and `Compose(seed=...)`) gives every transform its
    own generator seeded with the same `seed`, so the transforms' draws coincide: reseeded per sample, the
    flip decision was the scale's own uniform draw (flipped exactly when the scale was below the middle of
    the range; correlation -0.86 over 400 samples). `set_random_state` shares one generator instead."""
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


def train_transform(
    *, crop_size: int, scale_range: Sequence[float], flip: bool, seed: int | None = None, scale_step: float = 0.0
) -> A.Compose:
    low, high = scale_range
    steps = [
        RandomScaleCrop(
            crop_size=crop_size,
            scale_range=(low, high),
            scales=discrete_scales(low, high, scale_step) if scale_step else None,
            fill=MEAN_RGB_UINT8,
            fill_mask=IGNORE_INDEX,
        )
    ]
    if flip:
        steps.append(A.HorizontalFlip(p=0.5))
    transform = A.Compose(steps, strict=True)
    if seed is not None:
        seed_transform(transform, seed)
    return transform
