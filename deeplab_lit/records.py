"""The summary record: what `fit` and `evaluate` write (`summary.json`, `--json`) and the report reads.

One typed record with a schema version, so the writer and every reader agree on the fields:

    {"schema_version": 2, "kind": "fit" | "evaluate", "experiment": "v3", "split": "val",
     "metrics": {"val/mIoU": 0.7721, "val/mIoU_os8": ...},          # mIoU of every protocol (fractions)
     "results": {"mIoU": {"mIoU": .., "pixel_acc": .., "per_class_iou": {class: iou | null},
                          "protocol": {...}, "checkpoint": "...", "step": 30000}, ...},
     "per_class_iou": {...},                                        # the main protocol's, for a glance
     "protocol": {...},                                             # the run's columns for dashboards
     "config": {...}, "overrides": [...], "paper": {...}, "checkpoint": "...", "steps": 30000, ...,
     "best_on_val": {"checkpoint": ".../best-on-val.pt", "step": 20000, ...}}  # only with keep_best_on_val

`results` is keyed by `protocols.MetricKey` text; each entry carries the protocol that produced it and
the checkpoint and step it was computed from: for `fit`, the final weights (`model.pt` at the last step,
the end of the schedule, as the papers report). `best_on_val`, present only when the run kept a
best-on-val model file, says where it is and at which step it was selected; it is never in `results` or
`metrics`, so nothing compares it with the paper. A per-class IoU of a class absent from both prediction and
ground truth is null (it is left out of the mean).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from deeplab_lit.errors import UserError
from deeplab_lit.files import write_json_atomic
from deeplab_lit.protocols import MetricKey

SCHEMA_VERSION = 2


@dataclass(frozen=True)
class MetricResult:
    """One protocol's numbers (fractions in [0, 1])."""

    miou: float
    pixel_acc: float
    per_class_iou: dict[str, Optional[float]]
    protocol: dict  # Protocol.describe(crf) of the protocol that produced it
    checkpoint: str = ""
    step: Optional[int] = None

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
        }

    def write(self, path: str | Path) -> Path:
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
            weights=data.get("weights", ""), best_on_val=data.get("best_on_val"), schema_version=int(data["schema_version"]))

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
