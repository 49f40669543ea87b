"""Where runs come from: local summary records (`summary.json` + `per_image.npz` + the CSV log, fully
offline) and W&B runs (config, summary and history through the public API), read into one record type.

A W&B run whose summary names a `summary.json` that exists on this machine (a shared `runs/`) also gets
that file's per-image record and predictions, so its rows have intervals too.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

from deeplab_lit.errors import UserError
from deeplab_lit.records import PerImageCounts, SummaryRecord, per_image_path, predictions_dir, read_per_image
from deeplab_lit.report.curves import Curves, find_logs, read_csv_curves

# The image set a dataset is evaluated on: runs are compared with a paper row only on its own set.
EVAL_SETS = {"voc": "PASCAL VOC 2012 val", "voc_aug": "PASCAL VOC 2012 val", "cityscapes": "Cityscapes val",
             "synthetic": "the synthetic set"}


def eval_set(data_name: Optional[str]) -> str:
    return EVAL_SETS.get(data_name or "", data_name or "unknown data")


@dataclass
class RunRecord:
    experiment: str
    seed: int
    config: dict  # the resolved experiment, nested
    metrics: dict[str, float]  # "val/mIoU": 0.7123 (fractions)
    protocol: dict = field(default_factory=dict)  # fit's protocol record (train/eval stride, batch, init)
    protocols: dict = field(default_factory=dict)  # metric key without "val/" -> evaluation protocol
    overrides: list[str] = field(default_factory=list)
    steps: Optional[int] = None
    source: str = ""  # summary.json path or W&B run URL
    created: str = ""  # ISO time, for "newest"
    per_class: dict = field(default_factory=dict)  # metric key without "val/" -> {class: IoU or None}
    class_names: list[str] = field(default_factory=list)
    summary_path: Optional[str] = None  # the local summary.json (its side files are beside it)
    checkpoint: str = ""
    history: Optional[Callable[[], Curves]] = None  # W&B runs: their history, read on demand
    _per_image: Any = field(default=None, repr=False, compare=False)
    _curves: Any = field(default=None, repr=False, compare=False)
    per_image_note: str = ""

    @property
    def data_name(self) -> str:
        data = self.config.get("data") if isinstance(self.config, dict) else None
        return str(data.get("name", "")) if isinstance(data, dict) else ""

    @property
    def eval_set(self) -> str:
        return eval_set(self.data_name)

    @property
    def label(self) -> str:
        return f"{self.experiment} seed {self.seed}"

    def per_image(self) -> Optional[dict[str, PerImageCounts]]:
        """The per-image counts of every metric key, if the record's per_image.npz exists here and
        reproduces its summary's mIoUs exactly (else None, with `per_image_note` saying why)."""
        if self._per_image is None:
            self._per_image = self._load_per_image() or {}
        return self._per_image or None

    def _load_per_image(self) -> Optional[dict[str, PerImageCounts]]:
        if not self.summary_path:
            self.per_image_note = "no per-image record (W&B run without a local summary.json)"
            return None
        path = per_image_path(self.summary_path)
        if not path.is_file():
            self.per_image_note = f"no per-image record ({path.name} missing: evaluated before it existed)"
            return None
        try:
            counts = read_per_image(path)
        except UserError as error:
            self.per_image_note = str(error)
            return None
        for key, value in counts.items():
            logged = self.metrics.get(f"val/{key}")
            if logged is not None and value.miou != logged:
                self.per_image_note = (f"{path} does not reproduce {key} of its summary ({100 * value.miou:.4f} vs "
                                       f"{100 * logged:.4f}); left out")
                return None
        return counts

    @property
    def run_dir(self) -> Optional[Path]:
        """The training run directory, as it is on this machine: the summary's `<run dir>/checkpoints/..` (fit),
        else the checkpoint's (an `evaluate --json` record elsewhere), else the summary's directory."""
        for candidate in (self.summary_path, self.checkpoint):
            if candidate and Path(candidate).parent.name == "checkpoints" and Path(candidate).parent.parent.is_dir():
                return Path(candidate).parent.parent
        return Path(self.summary_path).parent if self.summary_path else None

    def curves(self) -> Curves:
        """train/loss, val/mIoU and the learning rate over steps; {} if none was logged."""
        if self._curves is None:
            curves: Curves = {}
            if self.run_dir is not None:
                curves = read_csv_curves(find_logs(self.run_dir))
            if not curves and self.history is not None:
                try:
                    curves = self.history()
                except Exception:  # network, API changes: the curves are optional
                    curves = {}
            self._curves = curves
        return self._curves

    def predictions(self, key: str) -> dict[str, Path]:
        """The saved label maps of metric key `key`: {file stem: PNG path}."""
        if not self.summary_path:
            return {}
        directory = predictions_dir(self.summary_path) / key
        return {p.stem: p for p in sorted(directory.glob("*.png"))} if directory.is_dir() else {}


def from_summary(record: SummaryRecord, source: str, created: str, summary_path: Optional[str] = None) -> RunRecord:
    return RunRecord(
        experiment=record.experiment, seed=record.seed, config=record.config, metrics=record.metrics,
        protocol=record.protocol, protocols={key: result.protocol for key, result in record.results.items()},
        overrides=list(record.overrides), steps=record.steps, source=source, created=created,
        per_class={key: dict(result.per_class_iou) for key, result in record.results.items()},
        class_names=list(record.class_names), summary_path=summary_path, checkpoint=record.checkpoint)


def load_local(root: Path) -> list[RunRecord]:
    """Every `summary.json` under `root` (fit writes `<run dir>/checkpoints/summary.json`)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--runs {root}: no such directory; fit writes runs to output_dir (default runs/)")
    records = []
    for path in sorted(root.rglob("summary.json")):
        created = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat()
        record = SummaryRecord.read(path)
        if record.weights == "best-on-val":  # selected on the evaluation split: never compared with the paper
            continue
        records.append(from_summary(record, str(path), created, str(path)))
    return records


def load_wandb(path: str, sweep: Optional[str] = None) -> tuple[list[RunRecord], Counter]:
    """Finished runs of a W&B project (or of one sweep in it); also counts the runs skipped by state."""
    import wandb

    from deeplab_lit.report.curves import wandb_curves

    if path.count("/") != 1:
        raise UserError(f"--wandb {path}: expected ENTITY/PROJECT")
    skipped: Counter = Counter()
    records = []
    try:
        api = wandb.Api()
        runs = api.sweep(f"{path}/{sweep}").runs if sweep else api.runs(path)
        for wandb_run in runs:
            if wandb_run.state != "finished":
                skipped[wandb_run.state] += 1
                continue
            config = dict(wandb_run.config)
            summary = dict(wandb_run.summary_metrics)
            name = config.get("name") or config.get("experiment")
            if not name or "model" not in config:
                skipped["not a deeplab_lit.fit run"] += 1
                continue
            local = summary.get("summary_json")
            local = str(local) if local and Path(str(local)).is_file() else None
            per_class = {"mIoU": {k.removeprefix("val/iou/"): float(v) for k, v in summary.items()
                                  if k.startswith("val/iou/") and isinstance(v, (int, float))}}
            records.append(RunRecord(
                experiment=name,
                seed=int(config.get("seed", 0)),
                config=config,
                metrics={k: float(v) for k, v in summary.items()
                         if k.startswith("val/mIoU") and isinstance(v, (int, float))},
                protocol=config.get("protocol", {}),
                overrides=list(config.get("overrides", [])),
                steps=summary.get("trainer/global_step"),
                source=wandb_run.url,
                created=str(wandb_run.created_at),
                per_class=per_class if per_class["mIoU"] else {},
                class_names=list(per_class["mIoU"]),
                summary_path=local,
                history=lambda run=wandb_run: wandb_curves(run),
            ))
    except UserError:
        raise
    except Exception as error:  # network, authentication, unknown project: many types, one message
        text = " ".join(str(error).split())[:200]
        raise UserError(f"--wandb {path}{' --sweep ' + sweep if sweep else ''}: {type(error).__name__}: {text}; "
                        "check `wandb login` and the path, or build the report from --runs DIR") from None
    return records, skipped
