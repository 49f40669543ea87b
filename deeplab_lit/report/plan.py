"""The reproduction plan: for every sweep file, its tables, runs and an estimate of GPU hours from the
networks' multiply-adds (counted on the meta device) and a stated throughput.
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from deeplab_lit.report.aggregate import matches
from deeplab_lit.report.render import fmt
from deeplab_lit.report.sources import RunRecord
from deeplab_lit.report.tables import TABLES, paper_number

def sweeps_dir() -> Path:
    from deeplab_lit.config import data_dir

    return data_dir("sweeps")
VAL_IMAGES = {"voc": (1449, (375, 500)), "voc_aug": (1449, (375, 500)), "cityscapes": (500, (1024, 2048)),
              "synthetic": (64, (97, 97))}  # images and a typical size (VOC: 500x375 is the commonest)


def grid_points(sweep: dict) -> list[dict]:
    """Every parameter combination of a grid sweep (`value` = one value)."""
    parameters = sweep.get("parameters", {})
    names = list(parameters)
    choices = [spec["values"] if "values" in spec else [spec["value"]] for spec in parameters.values()]
    return [dict(zip(names, combination)) for combination in itertools.product(*choices)]


def point_spec(point: dict):
    """The resolved run of one sweep grid point (what `fit` would run)."""
    from deeplab_lit.config import resolve_experiment

    overrides = [f"{k}={json.dumps(v)}" for k, v in point.items() if k not in ("experiment", "wandb.mode")]
    return resolve_experiment(point["experiment"], overrides)


def point_config(point: dict):
    return point_spec(point).config


@lru_cache(maxsize=None)
def _macs(model_yaml: str, num_classes: int, size: tuple[int, int], output_stride: int) -> int:
    import torch

    from deeplab_lit.config import ModelConfig
    from deeplab_lit.models import build_model, count_macs

    model_cfg = ModelConfig(**{**yaml.safe_load(model_yaml), "pretrained": "none"})  # counting needs no weights
    with torch.device("meta"):
        model = build_model(model_cfg, num_classes)
    if output_stride != model_cfg.output_stride:
        model.set_output_stride(output_stride)
    return count_macs(model, size)


def run_cost_flops(spec) -> dict:
    """Training and evaluation FLOPs of one run (multiply-adds x 2; backward = 2 x forward).

    Training: 3 x forward at the crop, batch x max_steps. Validation during training: the main
    protocol at the typical val image size every `val_check_interval` steps. Final evaluation: every
    protocol of the experiment (scales^2 x 2 with flip; sliding windows count their tiles). The CRF
    is not counted (it runs on the GPU in seconds per thousand images, or on CPUs).
    """
    cfg = spec.config
    model_yaml = yaml.safe_dump(spec.to_dict()["model"])
    classes = spec.dataset.num_classes
    images, (height, width) = VAL_IMAGES[cfg.data.name]
    train_os = cfg.model.output_stride
    steps = int(cfg.trainer.get("max_steps", 0))
    train = 6 * _macs(model_yaml, classes, (cfg.data.crop_size,) * 2, train_os) * cfg.data.batch_size * steps

    def protocol_macs(protocol) -> float:
        os_ = protocol.output_stride or train_os
        if protocol.mode == "slide":
            tiles = (math.ceil(max(height - protocol.slide_crop, 0) / protocol.slide_stride) + 1) * (
                math.ceil(max(width - protocol.slide_crop, 0) / protocol.slide_stride) + 1)
            one = tiles * _macs(model_yaml, classes, (protocol.slide_crop,) * 2, os_)
        else:
            one = _macs(model_yaml, classes, (height, width), os_)
        return one * sum(s * s for s in protocol.scales) * (2 if protocol.flip else 1)

    protocols = spec.protocols
    interval = cfg.trainer.get("val_check_interval") or steps
    validations = steps // int(interval) if isinstance(interval, int) and interval > 0 else 1
    validate = 2 * validations * images * protocol_macs(protocols[0])
    final = 2 * images * sum(protocol_macs(p) for p in protocols)
    return {"train": train, "validate": validate, "final": final}


@dataclass
class Plan:
    tables: list[list[str]]  # table, sweep files, runs, GPU hours, paper numbers
    sweeps: list[list[str]]  # sweep file, runs, GPU hours per run, GPU hours
    distinct_runs: int  # over all sweeps, a run shared by two sweeps (same run directory) counted once
    gpu_hours: float


def plan(sweep_files: Path | None = None, tflops: float = 40.0) -> Plan:
    """Runs and estimated GPU hours per paper table (through its sweep file) and per sweep file."""
    costed: dict[str, list[tuple[dict, RunRecord, float]]] = {}
    sweeps, distinct = [], {}
    for path in sorted(Path(sweep_files or sweeps_dir()).glob("*.yaml")):
        sweep = yaml.safe_load(path.read_text())
        if sweep.get("program") != "deeplab_lit.fit":
            sweeps.append([path.name, f"{sweep.get('run_cap', '?')} ({sweep['method']})", "CRF only: minutes", "—"])
            continue
        costed[path.name] = []
        for point in grid_points(sweep):
            spec = point_spec(point)
            hours = sum(run_cost_flops(spec).values()) / (tflops * 1e12) / 3600
            costed[path.name].append((point, RunRecord(spec.name, spec.config.seed, spec.to_dict(), {}), hours))
            distinct[spec.default_run_dir()] = hours  # two sweeps sharing a cell share its run directory
        hours = [h for _, _, h in costed[path.name]]
        sweeps.append([path.name, str(len(hours)), f"{min(hours):.1f}-{max(hours):.1f}", _hours(sum(hours))])
    tables = []
    for table in TABLES:
        points = [(p, h) for sweep in table.sweeps for p, record, h in costed.get(sweep, [])
                  if any(matches(record, table_row) for table_row in table.rows)]
        papers = []
        for table_row in table.rows:
            numbers = [paper_number(table_row.paper_experiment or table_row.experiments[0],
                                    table_row.paper or column.paper) for column in table.columns]
            if any(v is not None for v in numbers):
                papers.append(f"{table_row.label} " + "/".join(fmt(v) for v in numbers))
        tables.append([table.title, ", ".join(table.sweeps), str(len(points)), _hours(sum(h for _, h in points)),
                       " · ".join(papers) or "—"])
    return Plan(tables, sweeps, len(distinct), sum(distinct.values()))


def _hours(hours: float) -> str:
    return f"{hours:.1f}" if hours < 10 else f"{hours:.0f}"


