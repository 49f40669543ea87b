"""Cityscapes fine annotations: train_fine (2,975) / val (500), 19 trainId classes, 255 ignore.

Layout under `data.root` (the two archives leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip,
extracted side by side):
  leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
  gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
The labelIds (0..33) are mapped to trainIds on load through the label table of the official
`cityscapesscripts` package, so the 19 evaluated classes and the ignored ones are exactly the
benchmark's. A lookup table makes that a single indexing operation, so no trainId PNGs are written.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.labels import labels as CITYSCAPES_LABELS

from deeplab_lit.errors import UserError
from datamodules.base import SegmentationDataModule
from datamodules.dataset import Sample
from datamodules.readers import IGNORE_INDEX

IMAGE_SUFFIX = "_leftImg8bit.png"
MASK_SUFFIX = "_gtFine_labelIds.png"
SPLIT_SIZES = {"train": 2975, "val": 500}
ARCHIVES = {"leftImg8bit": "leftImg8bit_trainvaltest.zip", "gtFine": "gtFine_trainvaltest.zip"}
DOWNLOAD_HELP = (
    "Cityscapes needs a registered account: log in at https://www.cityscapes-dataset.com/downloads/ "
    f"and download {ARCHIVES['leftImg8bit']} and {ARCHIVES['gtFine']} (or run "
    f"`csDownload -d DIR {ARCHIVES['leftImg8bit']} {ARCHIVES['gtFine']}`, which asks for the login), "
    "then unzip both into the root"
)


def label_tables() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(valid labelIds as 256 bools, labelId -> trainId uint8 lookup, the 19 class names by trainId)
    from the cityscapesscripts table. trainIds 255 and -1 (license plate) are ignored."""
    valid = np.zeros(256, dtype=bool)
    to_train = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    names: dict[int, str] = {}
    for label in CITYSCAPES_LABELS:
        if label.id < 0:
            continue  # license plate: not stored in labelIds images
        valid[label.id] = True
        if 0 <= label.trainId < IGNORE_INDEX:
            to_train[label.id] = label.trainId
            names[label.trainId] = label.name
    return valid, to_train, [names[i] for i in range(len(names))]


VALID_LABEL_IDS, LABEL_TO_TRAIN_ID, CITYSCAPES_CLASSES = label_tables()


def train_id_tables() -> tuple[np.ndarray, np.ndarray]:
    """(trainId -> labelId uint8 lookup, trainId -> colour 256 x 3 uint8) from the cityscapesscripts table:
    what the benchmark's evaluation reads back (labelIds PNGs) and its colours. Values outside the 19
    trainIds map to labelId 0 (unlabeled) and black."""
    to_label = np.zeros(256, dtype=np.uint8)
    colours = np.zeros((256, 3), dtype=np.uint8)
    for label in CITYSCAPES_LABELS:
        if 0 <= label.trainId < IGNORE_INDEX and not label.ignoreInEval:
            to_label[label.trainId] = label.id
            colours[label.trainId] = label.color
    return to_label, colours


TRAIN_ID_TO_LABEL_ID, CITYSCAPES_PALETTE = train_id_tables()


def cityscapes_samples(root: Path, split: str) -> list[Sample]:
    """Every image of a split with its labelIds mask, sorted by name."""
    images_dir, masks_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    if not (root / "gtFine").is_dir():
        raise UserError(f"Cityscapes root {root} has no gtFine/ directory; {DOWNLOAD_HELP}")
    if not images_dir.is_dir():
        raise UserError(f"Cityscapes root {root} has no leftImg8bit/{split}/ directory; {DOWNLOAD_HELP}")
    samples = []
    for image in sorted(images_dir.glob(f"*/*{IMAGE_SUFFIX}")):
        name = image.name[: -len(IMAGE_SUFFIX)]
        mask = masks_dir / image.parent.name / f"{name}{MASK_SUFFIX}"
        if not mask.is_file():
            raise UserError(f"image {image} has no mask {mask}; re-extract {ARCHIVES['gtFine']}")
        samples.append(Sample(name, image, mask))
    if not samples:
        raise UserError(f"{images_dir} holds no *{IMAGE_SUFFIX} images; {DOWNLOAD_HELP}")
    return samples


def cityscapes_images(root: Path, split: str) -> list[tuple[str, Path]]:
    """(name, image) of every image of a split, ground truth or not (the test split has none), sorted."""
    images_dir = root / "leftImg8bit" / split
    images = sorted(images_dir.glob(f"*/*{IMAGE_SUFFIX}"))
    if not images:
        raise UserError(f"{images_dir} holds no <city>/*{IMAGE_SUFFIX} images; {DOWNLOAD_HELP}")
    return [(image.name[: -len(IMAGE_SUFFIX)], image) for image in images]


def check_cityscapes_tree(root: Path) -> list[str]:
    """What is missing from a Cityscapes root, one line per problem (empty = complete)."""
    problems = []
    for top, archive in ARCHIVES.items():
        if not (root / top).is_dir():
            problems.append(f"{root / top}/ is missing (from {archive})")
    if problems:
        return problems
    for split, expected in SPLIT_SIZES.items():
        images = sorted((root / "leftImg8bit" / split).glob(f"*/*{IMAGE_SUFFIX}"))
        if len(images) != expected:
            problems.append(f"leftImg8bit/{split} has {len(images)} images, the full set has {expected}")
        missing = [
            p for p in images
            if not (root / "gtFine" / split / p.parent.name / (p.name[: -len(IMAGE_SUFFIX)] + MASK_SUFFIX)).is_file()
        ]  # fmt: skip
        if missing:
            problems.append(f"{len(missing)} {split} images have no gtFine labelIds mask, e.g. {missing[0]}")
    return problems


class CityscapesDataModule(SegmentationDataModule):
    num_classes = 19
    class_names = CITYSCAPES_CLASSES
    eval_splits = ("train", "val")
    prediction_splits = ("test",)
    palette = CITYSCAPES_PALETTE
    prepare_command = "cityscapes"
    default_root_name = "cityscapes"

    def samples(self, split: str) -> list[Sample]:
        return cityscapes_samples(self.root, split)

    def unlabelled_images(self, split: str) -> list[tuple[str, Path]]:
        return cityscapes_images(self.root, split)

    def mask_values(self):
        return VALID_LABEL_IDS, "a Cityscapes labelId 0..33", LABEL_TO_TRAIN_ID
