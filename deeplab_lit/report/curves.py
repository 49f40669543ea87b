"""Training curves of a run: train/loss, val/mIoU and the learning rate over optimizer steps.

Offline they come from the CSV log every run writes beside W&B (Lightning's CSVLogger:
`<run dir>/**/metrics.csv`, header `epoch,step,<metric>,...` sorted by name, one line per logged step
and empty cells for the metrics not logged at that step); a run resumed into a new logger version has
several files, merged by step (the newer file wins where both have a step). From W&B they come from the
run's history (`Run.scan_history`).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Optional

# What the curves panel shows: (title, the logged names it reads, first match wins).
CURVES = (("train/loss", ("train/loss",)), ("val/mIoU", ("val/mIoU",)),
          ("learning rate", ("lr-SGD", "lr-SGD/pretrained", "lr-SGD/new")))
Curves = dict[str, list[tuple[int, float]]]  # panel title -> [(step, value)] sorted by step


def find_logs(run_dir: Path) -> list[Path]:
    """Every `metrics.csv` under a run directory, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(run_dir.rglob("metrics.csv"), key=lambda p: (p.stat().st_mtime, str(p)))


def read_csv_curves(paths: list[Path]) -> Curves:
    """The panels' curves from CSVLogger files (later files override earlier ones step by step)."""
    points: dict[str, dict[int, float]] = {}
    for path in paths:
        try:
            with open(path, newline="") as stream:
                for line in csv.DictReader(stream):
                    step = _number(line.get("step"))
                    if step is None:
                        continue
                    for name, value in line.items():
                        number = _number(value)
                        if name not in ("step", "epoch") and number is not None:
                            points.setdefault(name, {})[int(step)] = number
        except (OSError, UnicodeDecodeError, csv.Error):
            continue
    return select(points)


def select(points: dict[str, dict[int, float]]) -> Curves:
    curves = {}
    for title, names in CURVES:
        name = next((n for n in names if points.get(n)), None)
        if name is not None:
            curves[title] = sorted(points[name].items())
    return curves


def wandb_curves(wandb_run) -> Curves:
    """The panels' curves from a W&B run's history (one query per metric, keyed by trainer/global_step)."""
    points: dict[str, dict[int, float]] = {}
    for _, names in CURVES:
        for name in names:
            for line in wandb_run.scan_history(keys=["trainer/global_step", name]):
                step, value = _number(line.get("trainer/global_step")), _number(line.get(name))
                if step is not None and value is not None:
                    points.setdefault(name, {})[int(step)] = value
            if points.get(name):
                break
    return select(points)


def _number(value) -> Optional[float]:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
