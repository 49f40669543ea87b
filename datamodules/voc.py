"""PASCAL VOC 2012 (train 1,464 / val 1,449) and train_aug (10,582, with SBD).

Layout, as extracted from VOCtrainval_11-May-2012.tar under `data.root`:
  VOCdevkit/VOC2012/JPEGImages/<id>.jpg
  VOCdevkit/VOC2012/SegmentationClass/<id>.png        palette PNG: index = class, 255 = boundary
  VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val}.txt
the test images (no ground truth; VOC2012test.tar from the evaluation server, extracted into the same root):
  VOCdevkit/VOC2012/ImageSets/Segmentation/test.txt   with VOCdevkit/VOC2012/JPEGImages/<id>.jpg
and, written by `python -m datamodules.prepare sbd`:
  VOCdevkit/VOC2012/SegmentationClassAug/<id>.png     SBD masks converted once from .mat
  VOCdevkit/VOC2012/ImageSets/Segmentation/train_aug.txt
A root that is itself such a VOC2012 directory (JPEGImages/ directly inside) is accepted too; the
synthetic dataset uses that layout.

A train_aug image takes its mask from SegmentationClass when VOC has one (VOC masks have the 255
boundaries and are the reference), otherwise from SegmentationClassAug (SBD).
"""
from __future__ import annotations

from pathlib import Path

from deeplab_lit.errors import UserError
from datamodules.base import SegmentationDataModule
from datamodules.dataset import Sample

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]  # fmt: skip


def voc_dir(root: Path) -> Path:
    """The VOC2012 directory under a root (root/VOCdevkit/VOC2012, or root itself)."""
    nested = root / "VOCdevkit" / "VOC2012"
    return nested if nested.is_dir() or not (root / "JPEGImages").is_dir() else root


def split_file(voc: Path, split: str) -> Path:
    return voc / "ImageSets" / "Segmentation" / f"{split}.txt"


def read_ids(path: Path, prepare_hint: str) -> list[str]:
    """The image ids of a split list, one per line (blank lines skipped)."""
    if not path.is_file():
        raise UserError(f"split list {path} does not exist; {prepare_hint}")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def write_ids(path: Path, ids: list[str]) -> None:
    """Write a split list atomically, so an interrupted prepare never leaves half a list."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".txt.partial")
    partial.write_text("".join(f"{i}\n" for i in ids))
    partial.replace(path)


def voc_samples(voc: Path, split: str, prepare_hint: str) -> list[Sample]:
    """Samples of a split; an id whose image or mask is missing raises UserError naming the file."""
    ids = read_ids(split_file(voc, split), prepare_hint)
    images = voc / "JPEGImages"
    voc_masks, sbd_masks = voc / "SegmentationClass", voc / "SegmentationClassAug"
    # One directory listing each instead of thousands of stat() calls.
    have_images = _names(images)
    have_voc, have_sbd = _names(voc_masks), _names(sbd_masks)
    samples = []
    for name in ids:
        if f"{name}.jpg" not in have_images:
            raise UserError(f"image {images / (name + '.jpg')} (listed in {split}.txt) does not exist")
        mask_name = f"{name}.png"
        if mask_name in have_voc:
            mask = voc_masks / mask_name
        elif mask_name in have_sbd:
            mask = sbd_masks / mask_name
        else:
            raise UserError(
                f"image {images / (name + '.jpg')} has no mask {voc_masks / mask_name}"
                + (f" or {sbd_masks / mask_name}" if split == "train_aug" else "")
                + f"; {prepare_hint}"
            )
        samples.append(Sample(name, images / f"{name}.jpg", mask))
    return samples


def _names(directory: Path) -> set[str]:
    return set(p.name for p in directory.iterdir()) if directory.is_dir() else set()


class VOCDataModule(SegmentationDataModule):
    """`voc`: train on VOC 2012 train (1,464), evaluate on val (1,449)."""

    num_classes = 21
    class_names = VOC_CLASSES
    train_split = "train"
    eval_splits = ("train", "val", "train_aug")
    prediction_splits = ("test",)
    prepare_command = "voc"
    default_root_name = "voc"

    def unlabelled_images(self, split: str) -> list[tuple[str, Path]]:
        voc = voc_dir(self.root)
        hint = ("the VOC 2012 test images come from the evaluation server (VOC2012test.tar); extract it into "
                f"{self.root} so that VOCdevkit/VOC2012/ImageSets/Segmentation/{split}.txt exists")
        ids = read_ids(split_file(voc, split), hint)
        images, have = voc / "JPEGImages", _names(voc / "JPEGImages")
        missing = [name for name in ids if f"{name}.jpg" not in have]
        if missing:
            raise UserError(f"image {images / (missing[0] + '.jpg')} (listed in {split}.txt) does not exist; {hint}")
        return [(name, images / f"{name}.jpg") for name in ids]

    def check_root(self) -> None:
        super().check_root()
        voc = voc_dir(self.root)
        if not (voc / "JPEGImages").is_dir():
            raise UserError(
                f"data.root {self.root} holds neither VOCdevkit/VOC2012/JPEGImages nor JPEGImages; prepare "
                f"it with `python -m datamodules.prepare {self.prepare_command} --root {self.root}`"
            )

    def samples(self, split: str) -> list[Sample]:
        command = "sbd" if split == "train_aug" else self.prepare_command
        hint = f"run `python -m datamodules.prepare {command} --root {self.root}`"
        return voc_samples(voc_dir(self.root), split, hint)


class VOCAugDataModule(VOCDataModule):
    """`voc_aug`: train on train_aug (10,582 = VOC train + SBD train + SBD val - VOC val), evaluate
    on VOC val (1,449): the setting of every VOC table in the papers."""

    train_split = "train_aug"
