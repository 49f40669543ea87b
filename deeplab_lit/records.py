"""The summary record: what `fit` and `evaluate` write (`summary.json`, `--json`) and the report reads.

One typed record with a schema version, so the writer and every reader agree on the fields:

    {"schema_version": 2, "kind": "fit" | "evaluate", "experiment": "v3", "split": "val",
     "metrics": {"val/mIoU": 0.7721, "val/mIoU_os8": ...},          # mIoU of every protocol (fractions)
     "results": {"mIoU": {"mIoU": .., "pixel_acc": .., "per_class_iou": {class: iou | null},
                          "protocol": {...}, "checkpoint": "...", "step": 30000}, ...},
     "per_class_iou": {...},                                        # the main protocol's, for a glance
     "protocol": {...},                                             # the run's columns for dashboards
     "config": {...}, "overrides": [...], "paper": {...}, "checkpoint": "...", "steps": 30000, ...,
     "best_on_val": {"checkpoint": ".../best-on-val.pt", "step": 20000, ...},  # only with keep_best_on_val
     "crf_search": {"images": 100, "indices": [0, 15, ...], "best": {"bi_w": 5.0, ...},  # only with crf.search
                    "best_miou": .., "miou_without_crf": .., "settings": 485, "note": "..."}}

`results` is keyed by `protocols.MetricKey` text; each entry carries the protocol that produced it and
the checkpoint and step it was computed from: for `fit`, the final weights (`model.pt` at the last step,
the end of the schedule, as the papers report). `best_on_val`, present only when the run kept a
best-on-val model file, says where it is and at which step it was selected; it is never in `results` or
`metrics`, so nothing compares it with the paper. `crf_search`, present only when `fit` ran the papers' CRF
search (`crf.search`), holds the CRF parameters found (the `*_crf` results were computed with them, not
with `config.crf`'s), the search images (val positions, also part of the reported val, as in the papers)
and the search subset's mIoU without and with the CRF. A per-class IoU of a class absent from both
prediction and ground truth is null (it is left out of the mean).

Beside the JSON, `SummaryRecord.write` puts two side files (never part of the JSON):

- the per-image record `per_image.npz` (for `summary.json`; `X.per_image.npz` for any other `X.json`,
  e.g. `evaluate --json os8.json` -> `os8.per_image.npz`), read with `numpy.load(allow_pickle=False)`:
      names                 N image ids (str), in dataset order (also under DDP)
      class_names           C class names
      <K>.intersection      N x C int64: pixels of class c predicted c, per image, for metric key K
      <K>.union             N x C int64: pixels predicted c or labelled c (ignored pixels excluded)
      <K>.confusion         C x C int64: the split's confusion matrix (rows ground truth, columns prediction)
  for every metric key K of `results` ("mIoU", "mIoU_os8_ms_flip", "mIoU_crf", ...). The reported mIoU is
  `miou_from_counts(<K>.intersection.sum(0), <K>.union.sum(0))`, exactly (the same integers, the same
  float64 operations), so the file reproduces the JSON's number bit for bit.
- the predictions of the first `eval.qualitative_images` images: `predictions/<K>/<name>.png` (for
  `summary.json`; `X.predictions/` for `X.json`), palette PNGs of class indices (VOC colours), `/` in
  a name written as `__`. The report shows them beside the image and its ground truth.
"""
from __future__ import annotations

import io
import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from deeplab_lit.errors import UserError
from deeplab_lit.files import atomic_write, write_json_atomic
from deeplab_lit.palette import VOC_PALETTE
from deeplab_lit.protocols import MetricKey

# The version changes when a field changes meaning or a required field appears; an optional field that is
# absent when unused (best_on_val, crf_search) leaves it: every reader of version 2 reads such files.
SCHEMA_VERSION = 2
PER_IMAGE_VERSION = 1


def iou_from_counts(intersection: np.ndarray, union: np.ndarray) -> np.ndarray:
    """Per-class IoU (float64) from summed pixel counts (..., C); NaN where a class has an empty union
    (absent from prediction and ground truth), as torchmetrics' JaccardIndex(zero_division=nan)."""
    intersection, union = np.asarray(intersection, np.int64), np.asarray(union, np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, intersection / np.maximum(union, 1), np.nan)


def miou_from_counts(intersection: np.ndarray, union: np.ndarray) -> float:
    """The mean IoU over the classes with a non-zero union; NaN if there is none. The one function that
    turns counts into the reported mIoU (the evaluation and every reader of per_image.npz call it)."""
    per_class = iou_from_counts(intersection, union)
    if np.isnan(per_class).all():
        return float("nan")
    return float(np.nanmean(per_class))


@dataclass(frozen=True, eq=False)
class PerImageCounts:
    """One metric key's per-image pixel counts: intersection and union per image and class (N x C int64),
    the image ids (dataset order) and the split's C x C confusion matrix (rows ground truth)."""

    names: tuple[str, ...]
    intersection: np.ndarray
    union: np.ndarray
    confusion: Optional[np.ndarray] = None

    def __post_init__(self):
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        object.__setattr__(self, "intersection", np.asarray(self.intersection, np.int64))
        object.__setattr__(self, "union", np.asarray(self.union, np.int64))
        shape = (len(self.names), self.intersection.shape[-1] if self.intersection.ndim == 2 else 0)
        if self.intersection.shape != self.union.shape or self.intersection.ndim != 2 or \
                self.intersection.shape[0] != len(self.names):
            raise ValueError(f"per-image counts: {len(self.names)} names, intersection {self.intersection.shape}, "
                             f"union {self.union.shape}; expected {shape} both")

    @property
    def miou(self) -> float:
        return miou_from_counts(self.intersection.sum(0), self.union.sum(0))

    @property
    def per_class_iou(self) -> np.ndarray:
        return iou_from_counts(self.intersection.sum(0), self.union.sum(0))

    def subset(self, names) -> "PerImageCounts":
        """These counts restricted to (and ordered as) `names`."""
        position = {name: i for i, name in enumerate(self.names)}
        rows = [position[name] for name in names]
        return PerImageCounts(tuple(names), self.intersection[rows], self.union[rows], None)


def sidecar_path(json_path: str | Path, name: str) -> Path:
    """A side file of a summary record: `<dir>/<name>` beside `summary.json`, `<dir>/<stem>.<name>` beside
    any other `<stem>.json` (so two evaluations written into one directory never share one)."""
    json_path = Path(json_path)
    if json_path.name == "summary.json":
        return json_path.with_name(name)
    return json_path.with_name(f"{json_path.stem}.{name}")


def per_image_path(json_path: str | Path) -> Path:
    return sidecar_path(json_path, "per_image.npz")


def predictions_dir(json_path: str | Path) -> Path:
    return sidecar_path(json_path, "predictions")


def safe_name(name: str) -> str:
    """An image id as a file name: '/' (and anything odd) -> '__'."""
    return re.sub(r"[^A-Za-z0-9._-]", "__", name.replace("/", "__")) or "_"


def write_per_image(path: str | Path, counts: Mapping[str, PerImageCounts], class_names) -> Path:
    """`per_image.npz` (see the module docstring); every key must cover the same images."""
    keys = list(counts)
    if not keys:
        raise ValueError("no per-image counts to write")
    names = counts[keys[0]].names
    arrays = {"format_version": np.array(PER_IMAGE_VERSION), "names": np.array(names, dtype=str),
              "class_names": np.array(list(class_names), dtype=str)}
    for key in keys:
        if counts[key].names != names:
            raise ValueError(f"per-image counts of {key} cover other images than those of {keys[0]}")
        arrays[f"{key}.intersection"] = counts[key].intersection
        arrays[f"{key}.union"] = counts[key].union
        if counts[key].confusion is not None:
            arrays[f"{key}.confusion"] = np.asarray(counts[key].confusion, np.int64)
    return atomic_write(path, lambda stream: np.savez_compressed(stream, **arrays))


def read_per_image(path: str | Path) -> dict[str, PerImageCounts]:
    """The per-image counts of every metric key in a `per_image.npz`; a broken file is one line naming it."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError) as error:
        raise UserError(f"{path}: not a per_image.npz written by deeplab_lit ({type(error).__name__}); "
                        "re-run the evaluation") from None
    try:
        names = tuple(arrays["names"].tolist())
        keys = [name[: -len(".intersection")] for name in arrays if name.endswith(".intersection")]
        return {key: PerImageCounts(names, arrays[f"{key}.intersection"], arrays[f"{key}.union"],
                                    arrays.get(f"{key}.confusion")) for key in keys}
    except (KeyError, ValueError) as error:
        raise UserError(f"{path}: per-image record lacks or mangles {error}; re-run the evaluation") from None


def write_predictions(directory: str | Path, predictions: Mapping[str, Mapping[str, np.ndarray]]) -> Path:
    """`<directory>/<key>/<name>.png` for every metric key's label maps (uint8 H x W), replacing what a
    previous evaluation left there."""
    from PIL import Image

    directory = Path(directory)
    for key, maps in predictions.items():
        target = directory / key
        if target.is_dir():
            shutil.rmtree(target)
        for name, labels in maps.items():
            png = Image.fromarray(np.asarray(labels, np.uint8), mode="P")
            png.putpalette(VOC_PALETTE.reshape(-1).tolist())
            buffer = io.BytesIO()
            png.save(buffer, format="PNG")
            atomic_write(target / f"{safe_name(name)}.png", lambda stream, data=buffer.getvalue(): stream.write(data))
    return directory


@dataclass(frozen=True)
class MetricResult:
    """One protocol's numbers (fractions in [0, 1])."""

    miou: float
    pixel_acc: float
    per_class_iou: dict[str, Optional[float]]
    protocol: dict  # Protocol.describe(crf) of the protocol that produced it
    checkpoint: str = ""
    step: Optional[int] = None
    # Not in the JSON: written beside it by SummaryRecord.write (per_image.npz, predictions/).
    per_image: Optional[PerImageCounts] = field(default=None, compare=False, repr=False)
    predictions: Mapping[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    def to_json(self) -> dict:
        return {"mIoU": self.miou, "pixel_acc": self.pixel_acc,
                "per_class_iou": {k: _finite_or_none(v) for k, v in self.per_class_iou.items()},
                "protocol": self.protocol, "checkpoint": self.checkpoint, "step": self.step}

    @classmethod
    def from_json(cls, data: dict) -> "MetricResult":
        return cls(miou=float(data["mIoU"]), pixel_acc=float(data["pixel_acc"]),
                   per_class_iou=dict(data["per_class_iou"]), protocol=dict(data["protocol"]),
                   checkpoint=str(data.get("checkpoint", "")), step=data.get("step"))


@dataclass(frozen=True)
class SummaryRecord:
    kind: str  # "fit" (final evaluation of a training run) or "evaluate"
    experiment: str
    split: str
    results: dict[str, MetricResult]  # MetricKey text -> result
    config: dict  # the resolved config, plain
    class_names: list[str]
    seed: int = 0
    description: str = ""
    ablation: str = ""
    overrides: list[str] = field(default_factory=list)
    protocol: dict = field(default_factory=dict)  # the run's columns: train/eval OS, BN, batch, init, ...
    paper: dict = field(default_factory=dict)
    checkpoint: str = ""
    steps: Optional[int] = None
    wall_time_s: Optional[float] = None
    device: str = ""
    weights: str = ""  # "final" (the end of the schedule), "best-on-val" (selected on val) or "checkpoint"
    best_on_val: Optional[dict] = None  # keep_best_on_val: file, step, val mIoU at selection (never compared)
    crf_search: Optional[dict] = None  # crf.search: the CRF parameters found, the search images, their mIoU
    schema_version: int = SCHEMA_VERSION

    @property
    def metrics(self) -> dict[str, float]:
        """mIoU of every protocol under its logged name, e.g. {"val/mIoU_os8": 0.78}."""
        return {MetricKey.parse(key).logged("mIoU", self.split): r.miou for key, r in self.results.items()}

    def to_json(self) -> dict:
        main = self.results.get("mIoU")
        return {
            "schema_version": self.schema_version, "kind": self.kind, "experiment": self.experiment,
            "description": self.description, "ablation": self.ablation, "seed": self.seed, "split": self.split,
            "metrics": self.metrics,
            "results": {key: result.to_json() for key, result in self.results.items()},
            "per_class_iou": main.to_json()["per_class_iou"] if main else {},
            "protocol": self.protocol, "config": self.config, "overrides": list(self.overrides),
            "paper": self.paper, "class_names": list(self.class_names), "checkpoint": self.checkpoint,
            "steps": self.steps, "wall_time_s": self.wall_time_s, "device": self.device, "weights": self.weights,
            **({"best_on_val": self.best_on_val} if self.best_on_val else {}),
            **({"crf_search": self.crf_search} if self.crf_search else {}),
        }

    def write(self, path: str | Path) -> Path:
        """The JSON at `path`, and beside it (written first, so a JSON never pairs with older side files
        of its own writing) the per-image record and the predictions of the results that carry them."""
        path = Path(path)
        counts = {key: r.per_image for key, r in self.results.items() if r.per_image is not None}
        if counts:
            write_per_image(per_image_path(path), counts, self.class_names)
        else:
            per_image_path(path).unlink(missing_ok=True)
        predictions = {key: r.predictions for key, r in self.results.items() if r.predictions}
        if predictions:
            write_predictions(predictions_dir(path), predictions)
        elif predictions_dir(path).is_dir():
            shutil.rmtree(predictions_dir(path))
        return write_json_atomic(path, self.to_json())

    @classmethod
    def from_json(cls, data: dict) -> "SummaryRecord":
        return cls(
            kind=data["kind"], experiment=data["experiment"], split=data["split"],
            results={key: MetricResult.from_json(value) for key, value in data["results"].items()},
            config=data["config"], class_names=list(data["class_names"]), seed=int(data.get("seed", 0)),
            description=data.get("description", ""), ablation=data.get("ablation", ""),
            overrides=list(data.get("overrides", [])), protocol=dict(data.get("protocol", {})),
            paper=dict(data.get("paper", {})), checkpoint=data.get("checkpoint", ""), steps=data.get("steps"),
            wall_time_s=data.get("wall_time_s"), device=data.get("device", ""),
            weights=data.get("weights", ""), best_on_val=data.get("best_on_val"), crf_search=data.get("crf_search"),
            schema_version=int(data["schema_version"]))

    @classmethod
    def read(cls, path: str | Path) -> "SummaryRecord":
        """A record from a file; anything else is one line naming the file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserError(f"{path}: not a summary.json written by deeplab_lit.fit or evaluate ({type(error).__name__}); "
                            "delete it or re-run the evaluation") from None
        if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
            found = data.get("schema_version") if isinstance(data, dict) else None
            raise UserError(f"{path}: summary record schema {found!r}, this version reads {SCHEMA_VERSION}; re-run "
                            "`python -m deeplab_lit.evaluate --checkpoint ... --json` on its checkpoint")
        try:
            return cls.from_json(data)
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(f"{path}: summary record lacks or mangles {error}; re-run the evaluation") from None


def _finite_or_none(value: Optional[float]) -> Optional[float]:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def any_summary(data: Any) -> bool:
    """Whether a parsed JSON object looks like a summary record of any version (for directory scans)."""
    return isinstance(data, dict) and "experiment" in data and ("results" in data or "metrics" in data)
