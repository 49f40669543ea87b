"""The embedded synthetic dataset: the quick start's data, generated in seconds, no download.

Five classes of coloured shapes (disc, square, triangle, star, cross) on textured grey backgrounds,
written in VOC layout (JPEGImages/*.jpg, SegmentationClass/*.png palette PNGs with a 255 band on
every object boundary, like VOC's "void" outlines, ImageSets/Segmentation/{train,val}.txt).

It is meant to be learnable by a DeepLab trained from scratch on a CPU within minutes, yet not by a
colour threshold alone: each class has its own hue (a cue a small network picks up quickly) with
jittered saturation, brightness and shading; the shapes come at half-sizes from 8 to 44 px (several
scales relative to 97-129 px crops), rotated; later objects occlude earlier ones; backgrounds carry
low-frequency noise, stripes and pixel noise. Every image is drawn from its own generator seeded by
(seed, split, index), so the files are a pure function of the seed.

With `data.root` empty the dataset lives in `$DEEPLAB_LIT_CACHE/synthetic` (default
`~/.cache/deeplab_lit/synthetic`) and is written on first use: into a temporary sibling directory,
renamed into place only when complete, so a killed run leaves nothing half-written and two processes
racing (DDP ranks) both end up using one complete copy.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np

from deeplab_lit.errors import UserError
from datamodules.readers import IGNORE_INDEX, write_index_png
from datamodules.voc import VOCDataModule, write_ids

GENERATOR_VERSION = 1
SYNTHETIC_CLASSES = ["background", "disc", "square", "triangle", "star", "cross"]
# OpenCV hue (0..180) of each object class: red, green, blue, yellow, magenta.
CLASS_HUES = {1: 0, 2: 60, 3: 120, 4: 28, 5: 150}
IMAGE_SIZE = (160, 120)  # width, height
SPLIT_SIZES = {"train": 300, "val": 60}
META_FILE = "synthetic.json"


def default_cache_dir() -> Path:
    return Path(os.environ.get("DEEPLAB_LIT_CACHE") or Path.home() / ".cache" / "deeplab_lit")


def default_synthetic_root() -> Path:
    return default_cache_dir() / "synthetic"


# -- drawing ------------------------------------------------------------------------------------


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A grey-ish (low saturation) textured background, float32 RGB 0..255."""
    base = rng.uniform(60, 200)
    tint = rng.uniform(-12, 12, size=3)  # a faint colour cast, far from the objects' saturation
    coarse = rng.normal(0, 1, size=(rng.integers(3, 7), rng.integers(3, 7))).astype(np.float32)
    blobs = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC) * rng.uniform(10, 35)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 30)
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    stripes *= rng.uniform(0, 20) * (rng.random() < 0.6)
    grey = base + blobs + stripes
    image = grey[..., None] + tint + rng.normal(0, 5, size=(height, width, 3))
    return image.astype(np.float32)


def _shape_mask(rng: np.random.Generator, cls: int, width: int, height: int) -> np.ndarray:
    """A filled shape of class `cls` at a random place, size and rotation, as a bool H x W mask."""
    mask = np.zeros((height, width), dtype=np.uint8)
    size = rng.uniform(8, 44)  # half-size in pixels
    cx, cy = rng.uniform(0, width), rng.uniform(0, height)
    angle = rng.uniform(0, 2 * np.pi)

    def polygon(radii: np.ndarray, angles: np.ndarray) -> np.ndarray:
        a = angles + angle
        return np.stack([cx + radii * np.cos(a), cy + radii * np.sin(a)], axis=1).round().astype(np.int32)

    if cls == 1:  # disc (slightly elliptical)
        axes = (int(round(size)), int(round(size * rng.uniform(0.8, 1.0))))
        cv2.ellipse(mask, (int(round(cx)), int(round(cy))), axes, np.degrees(angle), 0, 360, 1, thickness=-1)
    elif cls == 2:  # square
        cv2.fillPoly(mask, [polygon(np.full(4, size), np.arange(4) * np.pi / 2 + np.pi / 4)], 1)
    elif cls == 3:  # triangle
        cv2.fillPoly(mask, [polygon(np.full(3, size * 1.1), np.arange(3) * 2 * np.pi / 3)], 1)
    elif cls == 4:  # five-pointed star
        radii = np.where(np.arange(10) % 2 == 0, size * 1.1, size * 0.45)
        cv2.fillPoly(mask, [polygon(radii, np.arange(10) * np.pi / 5)], 1)
    else:  # cross: two bars
        half_width = max(2.0, size * 0.3)
        for theta in (0.0, np.pi / 2):
            corner = np.hypot(size, half_width)
            offset = np.arctan2(half_width, size)
            angles = theta + np.array([offset, np.pi - offset, np.pi + offset, -offset])
            cv2.fillPoly(mask, [polygon(np.full(4, corner), angles)], 1)
    return mask.astype(bool)


def _object_pixels(rng: np.random.Generator, cls: int, width: int, height: int) -> np.ndarray:
    """The object's appearance over the whole canvas: its class hue, jittered, with shading."""
    hue = (CLASS_HUES[cls] + rng.uniform(-6, 6)) % 180
    hsv = np.array([[[hue, rng.uniform(140, 255), rng.uniform(120, 255)]]], dtype=np.float32)
    colour = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    direction = rng.uniform(0, 2 * np.pi)
    gradient = (xx * np.cos(direction) + yy * np.sin(direction)) / max(width, height)
    shading = 1.0 + rng.uniform(0.1, 0.35) * (gradient - gradient.mean())
    return colour * shading[..., None] + rng.normal(0, 6, size=(height, width, 3))


def draw_example(rng: np.random.Generator, width: int = IMAGE_SIZE[0], height: int = IMAGE_SIZE[1]):
    """(RGB uint8 image, uint8 label map with 255 boundaries) of one synthetic scene."""
    image = _background(rng, width, height)
    labels = np.zeros((height, width), dtype=np.uint8)
    for _ in range(rng.integers(1, 5)):
        cls = int(rng.integers(1, len(SYNTHETIC_CLASSES)))
        mask = _shape_mask(rng, cls, width, height)
        if mask.sum() < 30:  # mostly outside the canvas: nothing to learn from
            continue
        image[mask] = _object_pixels(rng, cls, width, height)[mask]
        labels[mask] = cls  # painted in order: later objects occlude earlier ones
    image = cv2.GaussianBlur(np.clip(image, 0, 255), (0, 0), 0.7)
    # VOC-style "void" band: every pixel within 1 px of a change of label (object/background and
    # object/object), i.e. where the 3x3 dilation and erosion of the label map disagree.
    kernel = np.ones((3, 3), np.uint8)
    boundary = cv2.dilate(labels, kernel) != cv2.erode(labels, kernel)
    labels[boundary] = IGNORE_INDEX
    return image.round().astype(np.uint8), labels


# -- writing ------------------------------------------------------------------------------------


def generate_synthetic(out_dir: Path, *, seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, int]:
    """Write the dataset into `out_dir` (VOC layout). Returns the image count per split."""
    out_dir, sizes = Path(out_dir), sizes or SPLIT_SIZES
    images, masks = out_dir / "JPEGImages", out_dir / "SegmentationClass"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    for split_index, (split, count) in enumerate(sizes.items()):
        ids = []
        for index in range(count):
            name = f"{split}_{index:04d}"
            image, labels = draw_example(np.random.default_rng([seed, split_index, index]))
            if not cv2.imwrite(str(images / f"{name}.jpg"), image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92]):
                raise UserError(f"cannot write {images / name}.jpg; check that the directory is writable")
            write_index_png(masks / f"{name}.png", labels)
            ids.append(name)
        write_ids(out_dir / "ImageSets" / "Segmentation" / f"{split}.txt", ids)
    meta = {"version": GENERATOR_VERSION, "seed": seed, "size": list(IMAGE_SIZE), "splits": dict(sizes),
            "classes": SYNTHETIC_CLASSES}  # fmt: skip
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")  # last: marks completion
    return dict(sizes)


def _is_current(root: Path) -> bool:
    try:
        return json.loads((root / META_FILE).read_text()).get("version") == GENERATOR_VERSION
    except (OSError, ValueError):
        return False


def ensure_synthetic(root: Path, *, seed: int = 0) -> Path:
    """Make `root` hold the current synthetic dataset, writing it atomically if it does not."""
    root = Path(root)
    if _is_current(root):
        return root
    if (root / META_FILE).is_file():  # written by an older generator: move it aside, then rebuild
        stale = root.with_name(f".{root.name}-stale-{os.getpid()}")
        try:
            os.rename(root, stale)
            shutil.rmtree(stale, ignore_errors=True)
        except FileNotFoundError:
            pass  # another process moved it first
    elif root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise UserError(f"{root} exists and is not a synthetic dataset (no {META_FILE}); remove it or pick another root")
    root.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{root.name}-partial-", dir=root.parent))
    try:
        generate_synthetic(partial, seed=seed)
        try:
            if root.is_dir():
                root.rmdir()  # empty (checked above); fails if another process just filled it
            os.rename(partial, root)
        except OSError:
            if not _is_current(root):  # lost a race to a process whose copy is complete: use it
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return root


class SyntheticDataModule(VOCDataModule):
    """`synthetic`: 300 train / 60 val images of 160x120, 6 classes including background."""

    num_classes = len(SYNTHETIC_CLASSES)
    class_names = SYNTHETIC_CLASSES
    eval_splits = ("train", "val")
    prepare_command = "synthetic"

    def __init__(self, data_cfg, seed=None):
        super().__init__(data_cfg, seed)
        self.use_cache = not data_cfg.root
        if self.use_cache:
            self.root = default_synthetic_root()

    def prepare_data(self) -> None:
        if self.use_cache:
            ensure_synthetic(self.root)

    def check_root(self) -> None:
        # Every rank may get here (prepare_data runs on one); ensure_synthetic is race-safe.
        if self.use_cache:
            ensure_synthetic(self.root)
        super().check_root()
