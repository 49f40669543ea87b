"""Segmenting image files with a trained model and writing the results in the formats people need.

What `python -m deeplab_lit.predict` does, as a library:

- `list_inputs(text)`: a directory (its images, recursively, sorted), one image file, or a glob pattern;
  `split_inputs(segmenter, split)`: every image of a split of the run's dataset, ground truth or not
  (VOC test, Cityscapes test). Each input gets a `key`, the output's name without its suffix.
- `predict_files(segmenter, inputs, out, format)`: reads the images (greyscale and RGBA become RGB),
  segments them with `api.Segmenter` (the run's normalisation, padding, protocol and CRF), writes one
  output per image at the image's own size, each atomically, with a progress bar. A corrupt or unreadable
  image stops the run with a UserError naming it, after every image before it has been written.

Formats (`FORMATS`):
  index       palette PNG of the class indices (the dataset's colours: VOC's palette for VOC models)
  color       RGB PNG of the class colours
  overlay     RGB PNG: the image blended half and half with the class colours
  voc         the VOC evaluation server's layout: results/VOC2012/Segmentation/<comp>_test_cls/<id>.png,
              palette PNGs of class indices; comp6 ("trained with data outside VOC", which includes
              ImageNet initialisation and SBD's train_aug), comp5 only for a model trained from scratch on
              VOC 2012 train alone; `tar -czf results.tgz -C OUT results` is the upload
  cityscapes  labelIds PNGs (8-bit, trainIds mapped back through cityscapesscripts' label table) named
              <city>/<city>_<seq>_<frame>_labelIds.png, what the benchmark's evalPixelLevelSemanticLabeling
              finds by the `<city>_<seq>_<frame>*.png` pattern
"""
from __future__ import annotations

import glob as globbing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from deeplab_lit.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
FORMATS = ("index", "color", "overlay", "voc", "cityscapes")
OVERLAY_ALPHA = 0.5  # weight of the class colour in `overlay`
CITYSCAPES_IMAGE_SUFFIX = "_leftImg8bit"


@dataclass(frozen=True)
class InputImage:
    path: Path
    key: str  # the output's relative name without suffix: "2007_000033", "frankfurt/frankfurt_000000_000294"


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _keyed(paths: Sequence[Path], base: Path) -> list[InputImage]:
    inputs, seen = [], {}
    for path in paths:
        key = path.relative_to(base).with_suffix("").as_posix()
        if key in seen:
            raise UserError(f"--input: {seen[key]} and {path} would write the same output {key}.png; "
                            "give them separately")
        seen[key] = path
        inputs.append(InputImage(path, key))
    return inputs


def list_inputs(text: str) -> list[InputImage]:
    """A directory (its images at any depth, sorted), an image file, or a glob pattern (sorted matches)."""
    path = Path(text)
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if _is_image(p))
        if not found:
            raise UserError(f"--input {text}: no images ({', '.join(IMAGE_SUFFIXES)}) in this directory")
        return _keyed(found, path)
    if path.is_file():
        return [InputImage(path, path.stem)]
    if globbing.has_magic(text):
        found = sorted(Path(p) for p in globbing.glob(text, recursive=True) if _is_image(Path(p)))
        if not found:
            raise UserError(f"--input {text}: the pattern matches no image file")
        base = Path(_common_parent(found))
        return _keyed(found, base)
    raise UserError(f"--input {text}: no such file or directory")


def _common_parent(paths: Sequence[Path]) -> str:
    import os

    return os.path.commonpath([str(p.parent.resolve()) for p in paths]) if paths else "."


def split_inputs(spec, split: str) -> list[InputImage]:
    """Every image of a split of the run's dataset (`data.root` as stored or overridden)."""
    from datamodules import build_datamodule

    datamodule = build_datamodule(spec.config.data)
    keyed = []
    for name, path in datamodule.images(split):
        if spec.config.data.name == "cityscapes":
            keyed.append(InputImage(Path(path), f"{Path(path).parent.name}/{name}"))
        else:
            keyed.append(InputImage(Path(path), name))
    return keyed


# ---------------------------------------------------------------------------------------------------
# Output formats


def palette_of(spec) -> np.ndarray:
    from datamodules import DATAMODULES

    return DATAMODULES[spec.config.data.name].palette


def voc_competition(spec) -> str:
    """comp5: trained on VOC 2012 data only (from scratch on `voc`); comp6: with outside data (ImageNet
    initialisation, SBD, COCO), which is every paper row."""
    config = spec.config
    return "comp5" if config.data.name == "voc" and config.model.pretrained == "none" else "comp6"


def check_format(spec, fmt: str) -> None:
    """Refuse a benchmark format the model's classes do not fit, before any work."""
    from datamodules.voc import VOC_CLASSES

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if fmt == "voc" and list(spec.dataset.class_names) != list(VOC_CLASSES):
        raise UserError(f"--format voc needs a model of the 21 VOC classes; this one was trained on "
                        f"data.name={spec.config.data.name}")
    if fmt == "cityscapes" and spec.config.data.name != "cityscapes":
        raise UserError(f"--format cityscapes needs a Cityscapes model (data.name=cityscapes); this one was trained "
                        f"on data.name={spec.config.data.name}")


def output_path(out: Path, item: InputImage, fmt: str, spec) -> Path:
    if fmt == "voc":
        name = Path(item.key).name
        return out / "results" / "VOC2012" / "Segmentation" / f"{voc_competition(spec)}_test_cls" / f"{name}.png"
    if fmt == "cityscapes":
        key = item.key[: -len(CITYSCAPES_IMAGE_SUFFIX)] if item.key.endswith(CITYSCAPES_IMAGE_SUFFIX) else item.key
        return out / f"{key}_labelIds.png"
    return out / f"{item.key}.png"


def render(labels: np.ndarray, rgb: np.ndarray, fmt: str, spec):
    """The PIL image to write for one prediction."""
    from PIL import Image

    palette = palette_of(spec)
    if fmt in ("index", "voc"):
        from datamodules.readers import VOC_PALETTE

        png = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8), mode="P")
        png.putpalette((VOC_PALETTE if fmt == "voc" else palette).reshape(-1).tolist())
        return png
    if fmt == "cityscapes":
        from datamodules.cityscapes import TRAIN_ID_TO_LABEL_ID

        return Image.fromarray(TRAIN_ID_TO_LABEL_ID[labels], mode="L")
    colours = palette[labels]
    if fmt == "overlay":
        blended = (1 - OVERLAY_ALPHA) * rgb.astype(np.float32) + OVERLAY_ALPHA * colours.astype(np.float32)
        colours = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(colours), mode="RGB")


def write_png(path: Path, image) -> Path:
    from deeplab_lit.files import atomic_write

    return atomic_write(path, lambda stream: image.save(stream, format="PNG"))


# ---------------------------------------------------------------------------------------------------
# The loop


def read_input(path: Path) -> np.ndarray:
    """RGB uint8 H x W x 3 (greyscale and RGBA files converted); a corrupt file is a UserError naming it."""
    from datamodules.readers import read_image

    return read_image(path)


def predict_files(segmenter, inputs: Sequence[InputImage], out: Path, fmt: str, *, batch_size: int = 4,
                  progress: bool = True, on_written: Optional[Callable[[Path], None]] = None) -> list[Path]:
    """Segment `inputs` in chunks of `batch_size` and write one `fmt` output each (see the module docstring)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    out = Path(out)
    written: list[Path] = []
    columns = [TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("•"),
               TimeRemainingColumn()]
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("predict", total=len(inputs))
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start : start + batch_size]
            images, failure = [], None
            for item in chunk:
                try:
                    images.append(read_input(item.path))
                except UserError as error:
                    failure = error  # write what came before it, then stop
                    break
            if images:
                labels = segmenter.predict_batch(images)
                for item, image, label in zip(chunk, images, labels):
                    path = write_png(output_path(out, item, fmt, segmenter.spec), render(label, image, fmt,
                                                                                        segmenter.spec))
                    written.append(path)
                    if on_written is not None:
                        on_written(path)
                bar.advance(task, len(images))
            if failure is not None:
                raise failure
    return written
