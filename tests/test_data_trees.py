"""Small dataset trees in each real on-disk format, written by the data tests (and checked here).

VOC: JPEGImages/*.jpg, SegmentationClass/*.png palette PNGs, ImageSets/Segmentation/*.txt.
SBD: benchmark_RELEASE/dataset/cls/*.mat (MATLAB struct GTcls with field Segmentation), train/val.txt.
Cityscapes: leftImg8bit/<split>/<city>/*_leftImg8bit.png, gtFine/.../*_gtFine_labelIds.png (8-bit grey).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import scipy.io
import scipy.sparse
from PIL import Image

from datamodules.readers import VOC_PALETTE


def random_mask(rng: np.random.Generator, height: int, width: int, num_classes: int, boundary: bool = True) -> np.ndarray:
    """Blocky class map using every class value it can, with a 255 outline like VOC's."""
    mask = np.zeros((height, width), np.uint8)
    for _ in range(6):
        y, x = rng.integers(0, height - 4), rng.integers(0, width - 4)
        h, w = rng.integers(4, height // 2 + 5), rng.integers(4, width // 2 + 5)
        mask[y : y + h, x : x + w] = rng.integers(1, num_classes)
    if boundary:
        edges = cv2.dilate(mask, np.ones((3, 3), np.uint8)) != cv2.erode(mask, np.ones((3, 3), np.uint8))
        mask[edges] = 255
    return mask


def write_jpeg(path: Path, rng: np.random.Generator, height: int, width: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (0, 0), 2)
    assert cv2.imwrite(str(path), image)


def write_palette_png(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    png = Image.fromarray(mask, mode="P")
    png.putpalette(VOC_PALETTE.reshape(-1).tolist())
    png.save(path)


def write_voc_tree(
    voc_root: Path, train: list[str], val: list[str], extra_images: list[str] = (), size=(40, 30), seed=0
) -> dict[str, np.ndarray]:
    """VOCdevkit/VOC2012 under voc_root with masks for train+val and JPEGs also for `extra_images`
    (images VOC has without a segmentation mask, as SBD's are). Returns id -> mask written."""
    rng = np.random.default_rng(seed)
    voc = voc_root / "VOCdevkit" / "VOC2012"
    width, height = size
    masks = {}
    for image_id in [*train, *val, *extra_images]:
        write_jpeg(voc / "JPEGImages" / f"{image_id}.jpg", rng, height, width)
    for image_id in [*train, *val]:
        masks[image_id] = random_mask(rng, height, width, 21)
        write_palette_png(voc / "SegmentationClass" / f"{image_id}.png", masks[image_id])
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (lists / "val.txt").write_text("".join(f"{i}\n" for i in val))
    (lists / "trainval.txt").write_text("".join(f"{i}\n" for i in [*train, *val]))
    return masks


def write_sbd_tree(root: Path, train: list[str], val: list[str], size=(40, 30), seed=1) -> dict[str, np.ndarray]:
    """benchmark_RELEASE/dataset under root, masks as MATLAB structs like SBD's. Returns id -> mask."""
    rng = np.random.default_rng(seed)
    dataset = root / "benchmark_RELEASE" / "dataset"
    (dataset / "cls").mkdir(parents=True, exist_ok=True)
    width, height = size
    masks = {}
    for image_id in [*train, *val]:
        mask = random_mask(rng, height, width, 21, boundary=False)  # SBD has no 255 boundary
        masks[image_id] = mask
        boundaries = np.empty((20, 1), dtype=object)  # a cell of one sparse edge map per class
        for k in range(20):
            boundaries[k, 0] = scipy.sparse.csc_matrix((height, width))
        gtcls = {
            "Segmentation": mask,
            "Boundaries": boundaries,
            "CategoriesPresent": np.unique(mask[mask > 0]).astype(np.uint8),
        }
        scipy.io.savemat(str(dataset / "cls" / f"{image_id}.mat"), {"GTcls": gtcls})
    (dataset / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (dataset / "val.txt").write_text("".join(f"{i}\n" for i in val))
    return masks


def write_cityscapes_tree(
    root: Path, counts={"train": 3, "val": 2}, size=(68, 20), seed=2, cities=("aachen", "bremen")
) -> dict[str, np.ndarray]:
    """A Cityscapes tree whose labelIds masks contain every labelId 0..33. Returns name -> labelIds."""
    rng = np.random.default_rng(seed)
    width, height = size
    masks = {}
    for split, count in counts.items():
        for index in range(count):
            city = cities[index % len(cities)]
            name = f"{city}_{index:06d}_000019"
            image_path = root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png"
            image_path.parent.mkdir(parents=True, exist_ok=True)
            image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            assert cv2.imwrite(str(image_path), image)
            label_ids = np.tile(np.repeat(np.arange(34, dtype=np.uint8), 2), (height, 1))
            label_ids = np.roll(label_ids, index, axis=1)
            path = root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(label_ids, mode="L").save(path)
            masks[name] = label_ids
    return masks


# -- the writers produce the real formats -------------------------------------------------------


def test_voc_tree_masks_are_palette_pngs_holding_the_indices(tmp_path):
    masks = write_voc_tree(tmp_path, ["a"], ["b"])
    with Image.open(tmp_path / "VOCdevkit/VOC2012/SegmentationClass/a.png") as png:
        assert png.mode == "P"
        assert np.array_equal(np.asarray(png), masks["a"])
        assert png.getpalette()[3:6] == [128, 0, 0]  # VOC's colour of class 1 (aeroplane)
    assert 255 in masks["a"]


def test_sbd_tree_masks_are_matlab_gtcls_structs(tmp_path):
    masks = write_sbd_tree(tmp_path, ["s"], [])
    mat = scipy.io.loadmat(str(tmp_path / "benchmark_RELEASE/dataset/cls/s.mat"))
    assert mat["GTcls"].dtype.names == ("Segmentation", "Boundaries", "CategoriesPresent")
    assert np.array_equal(mat["GTcls"]["Segmentation"][0, 0], masks["s"])


def test_cityscapes_tree_masks_are_grey_labelids(tmp_path):
    masks = write_cityscapes_tree(tmp_path, counts={"val": 1})
    (path,) = (tmp_path / "gtFine/val").glob("*/*_gtFine_labelIds.png")
    with Image.open(path) as png:
        assert png.mode == "L"
        assert sorted(np.unique(np.asarray(png))) == list(range(34))
    assert len(masks) == 1
