"""One map-style dataset for every source: a list of (name, image file, mask file) and a transform."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from deeplab_lit.errors import UserError
from datamodules.loaders import PADDING_INDEX, batch_buffers
from datamodules.readers import IGNORE_INDEX, check_mask_values, read_image, read_index_png
from datamodules.transforms import seed_transform


class Sample(NamedTuple):
    name: str
    image: Path
    mask: Path


class SegmentationDataset(Dataset):
    """Items are dicts: "image" uint8 3 x H x W (RGB, normalised later on the device, see
    deeplab_lit/preprocessing.py), "mask" uint8 H x W (255 = ignore), "name" str, and with `with_rgb`
    (evaluation, for the CRF) "rgb" uint8 H x W x 3. `transform` None (evaluation) keeps the image as it is.

    `valid_values` (256 bools) says which stored mask values are legal; anything else raises a
    UserError naming the file and the value. `label_map` (256 uint8), if given, then maps stored
    values to training ids (Cityscapes labelIds -> trainIds).
    """

    def __init__(
        self,
        samples: list[Sample],
        transform: Optional[A.Compose],
        *,
        valid_values: np.ndarray,
        expected_values: str,
        label_map: Optional[np.ndarray] = None,
        with_rgb: bool = False,
    ):
        self.samples = samples
        self.transform = transform
        self.valid_values = valid_values
        self.expected_values = expected_values
        self.label_map = label_map
        self.with_rgb = with_rgb

    def __len__(self) -> int:
        return len(self.samples)

    def seed(self, seed: int) -> None:
        """Reseed the augmentation. albumentations keeps its own RNG, which forked DataLoader workers
        would otherwise inherit identically (every worker producing the same crops)."""
        if self.transform is not None:  # evaluation items are not augmented
            seed_transform(self.transform, seed % 2**32)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The decoded RGB image and its label map (after `label_map`), both unaugmented."""
        sample = self.samples[index]
        image = read_image(sample.image)
        mask = read_index_png(sample.mask)
        check_mask_values(mask, self.valid_values, sample.mask, self.expected_values)
        if self.label_map is not None:
            mask = cv2.LUT(mask, self.label_map)
        if image.shape[:2] != mask.shape:
            raise UserError(
                f"image {sample.image} is {image.shape[1]}x{image.shape[0]} but its mask {sample.mask} "
                f"is {mask.shape[1]}x{mask.shape[0]}; they must have the same size"
            )
        return image, mask

    def example(self, key) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
        """(name, augmented image H x W x 3, augmented mask H x W, decoded image) of one key: an index,
        (index, augmentation seed) from the training sampler, or the evaluation sampler's PADDING_INDEX
        (the first image with every label ignored, named "")."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        if seed is not None:
            self.seed(seed)
        padding = index == PADDING_INDEX
        image, mask = self.load(0 if padding else index)
        if padding:
            mask = np.full_like(mask, IGNORE_INDEX)
        out = self.transform(image=image, mask=mask) if self.transform is not None else {"image": image, "mask": mask}
        return ("" if padding else self.samples[index].name), out["image"], out["mask"], image

    def __getitem__(self, key) -> dict:
        name, image, mask, decoded = self.example(key)
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "mask": torch.from_numpy(np.require(mask, np.uint8, ["C", "W"])),  # a copy only if read-only
            "name": name,
        }
        if self.with_rgb:
            item["rgb"] = torch.from_numpy(decoded)
        return item

    def __getitems__(self, keys: list) -> dict | list[dict]:
        """A batch of keys, which torch's DataLoader asks for instead of one `__getitem__` per key.

        Training crops all have one size, so the batch is written in place: the crops go straight into
        one uint8 buffer (shared memory inside a DataLoader worker, as torch's collate would allocate)
        that the batch's "image" (N x 3 x H x W, stored channels-last, i.e. as the crops are) and "mask"
        (N x H x W) tensors view. That saves the per-sample tensors, the transposition to 3 x H x W, the
        copy into the batch and one of the two shared-memory allocations per batch (about 1 ms each):
        collating had cost a worker 0.36 ms of its 3.3 ms per sample at crop 321. The training loader's
        collate is then `loaders.collated`, which passes the batch on.

        Evaluation items differ in size: they are returned one by one for `pad_collate`."""
        if self.transform is None:
            return [self[key] for key in keys]
        name, image, mask, _ = self.example(keys[0])  # its size is the batch's
        images, masks = batch_buffers(len(keys), *mask.shape)
        images_hwc, masks_hw = images.permute(0, 2, 3, 1).numpy(), masks.numpy()  # views of the same memory
        names = []
        for slot, key in enumerate(keys):
            if slot:
                name, image, mask, _ = self.example(key)
            images_hwc[slot], masks_hw[slot] = image, mask
            names.append(name)
        return {"image": images, "mask": masks, "name": names}
