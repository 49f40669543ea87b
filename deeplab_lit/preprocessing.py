"""Images travel as 8-bit and become network inputs on the device, in one place.

DataLoader workers decode and augment 8-bit RGB, and batches carry it as uint8 N x 3 x H x W (masks as
uint8 N x H x W, 255 = ignore; training images are stored channels-last, as decoded): a quarter of the
bytes of float32 to write into shared memory and to copy to the GPU, which is what kept one worker below
the GPU's appetite. The float conversion and the dataset's mean/std normalisation happen after the
transfer, here, for training, evaluation, the CRF search and the load API alike (`api.Segmenter`), so
every path feeds the network the same numbers.

Padding: augmentation pads crops with the dataset's mean colour as 8-bit RGB (`MEAN_RGB_UINT8`), which
normalises to within 0.006 of 0; inference pads normalised images with exactly 0 (inference.py).
"""
from __future__ import annotations

from typing import Sequence

import torch

# torchvision's ImageNet statistics (RGB, 0..1), which the ImageNet-initialised backbones expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (or float 0..255) N x 3 x H x W -> float32 (x / 255 - mean) / std, on the images' device."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1) * 255.0
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1) * 255.0
    return (images.float() - mean_t) / std_t


def prepare_batch(
    batch: dict, mean: Sequence[float], std: Sequence[float], memory_format: torch.memory_format = torch.contiguous_format
) -> dict:
    """A collated batch on its device: normalised float images in `memory_format` (training batches
    arrive stored channels-last, as the workers wrote the crops), int64 masks (what the loss indexes
    with). Batches that are already float (a user's own loader) are taken as normalised: only their memory
    format is set."""
    image = batch["image"]
    if image.dtype == torch.uint8:
        image = normalise(image, mean, std)
    batch["image"] = image.contiguous(memory_format=memory_format)
    if "mask" in batch and batch["mask"].dtype != torch.int64:
        batch["mask"] = batch["mask"].long()
    return batch
