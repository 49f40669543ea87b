"""Augmentation pipelines (albumentations 2.0.8, `strict=True` so a misspelt parameter is an error).

Training follows DeepLab v2/v3: random scale in `data.scale_range`, pad to the crop (image with the
ImageNet mean colour, which is 0 after normalisation; mask with 255 so padding is ignored by the loss),
random crop, horizontal flip. Images stay 8-bit: the float conversion and the mean/std normalisation
run on the device after the transfer (deeplab_lit/preprocessing.py). Evaluation takes the whole image,
unchanged, because padding to a stride multiple belongs to inference.

Discrete scales (`data.scale_step`, v3/v3+ rows): TF DeepLab's `get_random_scale` draws uniformly from
`linspace(min, max, int((max - min) / step + 1))` when its `scale_factor_step_size` (0.25 in train.py)
is set, e.g. {0.5, 0.75, ..., 2.0}; `DiscreteRandomScale` does the same.

Every keyword below was checked against albumentations 2.0.8: PadIfNeeded takes `fill`/`fill_mask`
(the pre-2.0 `value`/`mask_value` are silently dropped without `strict` and pad masks with 0, which
would teach the network that borders are background). RandomScale samples s uniformly from
`(1 + scale_limit[0], 1 + scale_limit[1])`, hence the `- 1.0` below.
"""
from __future__ import annotations

import cv2
import albumentations as A

from datamodules.readers import IGNORE_INDEX

from deeplab_lit.preprocessing import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401 (re-exported for the datamodules)
# The mean as an 8-bit RGB colour: what the image is padded with (normalises to ~0).
MEAN_RGB_UINT8 = tuple(round(255 * m) for m in IMAGENET_MEAN)


class DiscreteRandomScale(A.RandomScale):
    """RandomScale whose factor is one of `scales` (TF DeepLab's stepped random scale)."""

    def __init__(self, scales: list[float], **kwargs):
        super().__init__(scale_limit=(min(scales) - 1.0, max(scales) - 1.0), **kwargs)
        self.scales = [float(s) for s in scales]

    def get_params(self) -> dict[str, float]:
        return {"scale": self.py_random.choice(self.scales)}


def discrete_scales(low: float, high: float, step: float) -> list[float]:
    """TF DeepLab's preprocess_utils.get_random_scale: linspace(low, high, int((high - low) / step + 1))."""
    count = int((high - low) / step + 1)
    return [low + (high - low) * i / (count - 1) for i in range(count)] if count > 1 else [low]


def train_transform(
    *, crop_size: int, scale_range: tuple[float, float], flip: bool, seed: int | None = None, scale_step: float = 0.0
) -> A.Compose:
    low, high = scale_range
    scaling = dict(interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST, p=1.0)
    steps = [
        DiscreteRandomScale(discrete_scales(low, high, scale_step), **scaling) if scale_step
        else A.RandomScale(scale_limit=(low - 1.0, high - 1.0), **scaling),
        A.PadIfNeeded(
            min_height=crop_size,
            min_width=crop_size,
            position="center",
            border_mode=cv2.BORDER_CONSTANT,
            fill=MEAN_RGB_UINT8,
            fill_mask=IGNORE_INDEX,
        ),
        A.RandomCrop(height=crop_size, width=crop_size),
    ]
    if flip:
        steps.append(A.HorizontalFlip(p=0.5))
    return A.Compose(steps, strict=True, seed=seed)
