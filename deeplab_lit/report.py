"""python -m deeplab_lit.report --runs DIR [--out DIR] [--wandb ENTITY/PROJECT [--sweep ID]] [--log-wandb]

The ablation dashboard: every table of PAPERS.md, paper vs ours. Runs come from local run directories
(each finished `fit` writes `<run dir>/checkpoints/summary.json`; fully offline) and/or from W&B
through its public API. For each table row: the paper's mIoU, ours as mean ± std over seeds with the
number of runs and the difference, before and after the CRF where the paper has both, the evaluation
protocol the runs used, "not run" where no run matches; then whether the ablation's ordering and its
deltas agree with the paper (e.g. ASPP-L > ASPP-S > LargeFOV). Writes `report.md`, a self-contained
`report.html` (figures embedded as base64 PNG) and `figures/<table>.png`, one bar chart per table;
`--log-wandb` also logs every table as a `wandb.Table` (with its chart and the page) to W&B.

`--plan` prints the reproduction plan instead: for every sweep file, its tables, runs and an estimate
of GPU hours from the networks' multiply-adds (counted on the meta device) and a stated throughput.

Choices the papers leave open, and the one made here:
- A row is a set of runs: those of its experiment(s) whose resolved config has the row's defining
  values (e.g. `model.decoder_channels=8` for v3+ Table 1). One run per seed counts (the one with the
  most training steps, then the newest), so running two sweeps that share a cell never double-counts.
- std is the sample standard deviation (ddof 1) over seeds; with one run there is none.
- Ordering agreement compares, for each pair of rows the paper does not tie, the sign of the paper's
  difference with ours (Kendall's tau is shown too). Deltas are taken against the table's first row.
- Runs whose non-infrastructure overrides change the experiment (e.g. `trainer.max_steps=2`) are
  reported with those overrides in the notes, not hidden: a short debug run is visibly one.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import itertools
import json
import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import yaml

from deeplab_lit.cli import run
from deeplab_lit.errors import UserError

# ---------------------------------------------------------------------------------------------------
# The paper tables (PAPERS.md). Paper numbers are not repeated here: each row names the experiment
# (and key of its `paper` section) that holds its number, so experiments/*.yaml stay the one source.


@dataclass(frozen=True)
class Column:
    label: str
    metric: str = "val/mIoU"  # key of a run's metrics (fractions; shown as %)
    paper: str = "miou"  # miou | miou_crf | a key of the experiment's paper.metrics


@dataclass(frozen=True)
class Row:
    label: str
    experiments: tuple[str, ...]  # runs of any of these experiments ...
    where: tuple[tuple[str, Any], ...] = ()  # ... whose resolved config has these dotted values
    metric: Optional[str] = None  # single-column tables: this row's metric (an inference protocol)
    paper: Optional[str] = None  # this row's paper key (instead of the column's)
    paper_experiment: Optional[str] = None  # whose paper section holds it (default: experiments[0])


@dataclass(frozen=True)
class Table:
    id: str
    title: str
    rows: tuple[Row, ...]
    columns: tuple[Column, ...] = (Column("mIoU"),)
    sweeps: tuple[str, ...] = ()  # the files in sweeps/ whose grids train its rows (each cell in one file)
    compare_rows: bool = True  # the rows' ordering is the ablation's claim (not for the CRF table)
    note: str = ""


def row(label: str, experiment: str, metric: Optional[str] = None, paper: Optional[str] = None, **where) -> Row:
    """One experiment's runs; `where` keys use `__` for dots (model__decoder_channels=8)."""
    pairs = tuple((key.replace("__", "."), value) for key, value in where.items())
    return Row(label, (experiment,), pairs, metric, paper)


BEFORE_AFTER_CRF = (Column("before CRF", "val/mIoU", "miou"), Column("after CRF", "val/mIoU_crf", "miou_crf"))
V1_V2_VOC = ["v1_7x7", "v1_4x4", "v1_4x4_r8", "largefov", "v1_msc", "v1_msc_largefov", "v2_largefov", "aspp_s",
             "aspp_l", "v2_r101", "v2_r101_msc", "v2_r101_msc_coco", "v2_r101_msc_coco_aug", "v2_r101_largefov",
             "v2_r101_aspp"]
MS = "val/mIoU_os8_ms"

TABLES: tuple[Table, ...] = (
    Table("v1_table2_fov", "v1 Table 2: field of view of fc6 (VGG-16, VOC val)", (
        row("7x7, rate 4, 4096 wide", "v1_7x7"),
        row("4x4, rate 4, 4096 wide", "v1_4x4"),
        row("4x4, rate 8, 4096 wide", "v1_4x4_r8"),
        row("LargeFOV: 3x3, rate 12, 1024 wide", "largefov"),
    ), BEFORE_AFTER_CRF, sweeps=("fov.yaml",)),
    Table("v1_table1_msc", "v1 Table 1: multi-scale features (VGG-16, VOC val)", (
        row("DeepLab (4x4)", "v1_4x4"),
        row("DeepLab-MSc", "v1_msc"),
        row("DeepLab-LargeFOV", "largefov"),
        row("DeepLab-MSc-LargeFOV", "v1_msc_largefov"),
    ), BEFORE_AFTER_CRF, sweeps=("fov.yaml", "msc.yaml")),
    Table("v2_table3_aspp", "v2 Table 3: ASPP on VGG-16 (VOC val)", (
        row("LargeFOV", "v2_largefov"),
        row("ASPP-S {2, 4, 8, 12}", "aspp_s"),
        row("ASPP-L {6, 12, 18, 24}", "aspp_l"),
    ), BEFORE_AFTER_CRF, sweeps=("aspp.yaml",)),
    Table("v2_table4_resnet", "v2 Table 4: ResNet-101 (VOC val)", (
        row("ResNet-101", "v2_r101"),
        row("+ MSC", "v2_r101_msc"),
        row("+ COCO", "v2_r101_msc_coco"),
        row("+ scale aug", "v2_r101_msc_coco_aug"),
        row("LargeFOV", "v2_r101_largefov"),
        row("ASPP-L", "v2_r101_aspp"),
        row("ASPP-L + CRF", "v2_r101_aspp", metric="val/mIoU_crf", paper="miou_crf"),
    ), sweeps=("resnet.yaml",)),
    Table("v2_table9_cityscapes", "v2 Table 9: Cityscapes val, ResNet-101", (
        row("1x1 classifier", "cityscapes_v2_r101"),
        row("LargeFOV", "cityscapes_v2_r101_largefov"),
        row("ASPP-L", "cityscapes_v2_r101_aspp"),
        row("ASPP-L + scale aug", "cityscapes_v2_r101_aspp_aug"),
        row("ASPP-L + scale aug + CRF", "cityscapes_v2_r101_aspp_aug", metric="val/mIoU_crf", paper="miou_crf"),
    ), sweeps=("cityscapes.yaml",)),
    Table("crf_on_off", "CRF on vs off on the same checkpoint (v1 and v2, VOC val)",
          tuple(row(name, name, crf__enabled=True) for name in V1_V2_VOC), BEFORE_AFTER_CRF,
          sweeps=("fov.yaml", "msc.yaml", "aspp.yaml", "resnet.yaml", "crf.yaml"),
          compare_rows=False, note="Every run scores its best checkpoint without and with the CRF; the paper "
                                   "gives both only for some rows."),
    Table("v3_table1_output_stride", "v3 Table 1: output stride, ResNet-50 + block7 (VOC val)", (
        row("output stride 8", "v3_r50_block7_os8"),
        row("output stride 16", "v3_r50_block7_os16"),
        row("output stride 32", "v3_r50_block7_os32"),
    ), sweeps=("output_stride.yaml",)),
    Table("v3_table3_multi_grid", "v3 Table 3: multi-grid, ResNet-101 + block7, OS 16 (VOC val)", (
        row("MG (1, 1, 1)", "v3_block7_mg111"),
        row("MG (1, 2, 1)", "v3_block7_mg121"),
        row("MG (1, 2, 3)", "v3_block7_mg123"),
        row("MG (1, 2, 4)", "v3_block7_mg124"),
        row("MG (2, 2, 2)", "v3_block7_mg222"),
    ), sweeps=("multi_grid.yaml",)),
    Table("v3_table5_aspp", "v3 Table 5: ASPP, ResNet-101, OS 16 (VOC val)", (
        row("MG (1, 1, 1), ASPP (6, 12, 18)", "v3_aspp_mg111"),
        row("MG (1, 2, 1), ASPP (6, 12, 18)", "v3_aspp_mg121"),
        row("MG (1, 2, 4), ASPP (6, 12, 18)", "v3_aspp_mg124"),
        row("MG (1, 2, 4), ASPP (6, 12, 18, 24)", "v3_aspp_mg124_r24"),
        row("MG (1, 2, 4), ASPP (6, 12, 18) + image pooling", "v3"),
    ), sweeps=("multi_grid.yaml", "inference.yaml")),
    Table("v3_table6_inference", "v3 Table 6: inference strategy on one v3 checkpoint (VOC val)", (
        row("eval OS 16", "v3"),
        row("eval OS 8", "v3", metric="val/mIoU_os8", paper="val/mIoU_os8"),
        row("eval OS 8 + multi-scale", "v3", metric=MS, paper=MS),
        row("eval OS 8 + multi-scale + flip", "v3", metric=MS + "_flip", paper=MS + "_flip"),
    ), sweeps=("inference.yaml",)),
    Table("v3_table10_train_os", "v3 Table 10: train output stride x eval output stride (VOC val)", (
        row("train OS 8 (batch 6)", "v3_train_os8"),
        row("train OS 16 (batch 16)", "v3"),
        row("train OS 32 (batch 24)", "v3_train_os32"),
    ), (Column("eval OS 16", "val/mIoU", "miou"), Column("eval OS 8", "val/mIoU_os8", "val/mIoU_os8")),
        sweeps=("output_stride.yaml", "inference.yaml")),
    Table("v3_cityscapes", "v3 appendix: Cityscapes val, ResNet-101", (
        row("eval OS 16", "cityscapes_v3"),
        row("eval OS 8", "cityscapes_v3", metric="val/mIoU_os8", paper="val/mIoU_os8"),
        row("eval OS 8 + multi-scale", "cityscapes_v3", metric=MS, paper=MS),
        row("eval OS 8 + multi-scale + flip", "cityscapes_v3", metric=MS + "_flip", paper=MS + "_flip"),
    ), sweeps=("cityscapes.yaml",)),
    Table("v3plus_table1_decoder", "v3+ Table 1: decoder 1x1 projection width (one 3x3 conv, VOC val)", tuple(
        row(f"1x1 width {width}", "v3plus_1conv", paper=f"decoder_channels_{width}",
            model__decoder_channels=width, model__decoder_convs=1)
        for width in (8, 16, 32, 48, 64)
    ), sweeps=("decoder.yaml",)),
    Table("v3plus_table2_decoder_convs", "v3+ Table 2: decoder 3x3 convs (1x1 width 48, VOC val)", (
        row("one [3x3, 256]", "v3plus_1conv", model__decoder_channels=48, model__decoder_convs=1),
        Row("two [3x3, 256] (= v3plus)", ("v3plus_1conv", "v3plus"),
            (("model.decoder_channels", 48), ("model.decoder_convs", 2)), paper_experiment="v3plus"),
        row("three [3x3, 256]", "v3plus_1conv", paper="decoder_convs_3", model__decoder_channels=48,
            model__decoder_convs=3),
    ), sweeps=("decoder.yaml", "decoder_convs.yaml", "inference.yaml")),
    Table("v3plus_table3_inference", "v3+ Table 3: inference strategy, ResNet-101 (VOC val)", (
        row("train OS 16, eval OS 16", "v3plus"),
        row("eval OS 16 + multi-scale", "v3plus", metric="val/mIoU_ms", paper="val/mIoU_ms"),
        row("eval OS 16 + multi-scale + flip", "v3plus", metric="val/mIoU_ms_flip", paper="val/mIoU_ms_flip"),
        row("eval OS 8", "v3plus", metric="val/mIoU_os8", paper="val/mIoU_os8"),
        row("eval OS 8 + multi-scale + flip", "v3plus", metric="val/mIoU_os8_ms_flip", paper="val/mIoU_os8_ms_flip"),
        row("train OS 32, eval OS 32", "v3plus_train_os32"),
    ), sweeps=("inference.yaml",)),
    Table("v3plus_cityscapes", "v3+ on Cityscapes val (ResNet-101; the paper uses Xception-65)", (
        row("v3+ ResNet-101", "cityscapes_v3plus"),
    ), note="No paper number for ResNet-101; a public ResNet-101 reimplementation reports 80.97 with another "
            "recipe (crop 512x1024, 80k iterations, lr 0.01).", sweeps=("cityscapes.yaml",)),
)


@lru_cache(maxsize=None)
def experiment_config(name: str) -> dict:
    from deeplab_lit.config import load_experiment, to_dict

    return to_dict(load_experiment(name))


def paper_number(experiment: str, key: str) -> Optional[float]:
    paper = experiment_config(experiment)["paper"]
    value = paper.get(key) if key in ("miou", "miou_crf") else paper.get("metrics", {}).get(key)
    return None if value is None else float(value)


# ---------------------------------------------------------------------------------------------------
# Sources: local summary.json files and W&B runs, read into one record type.


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


def load_local(root: Path) -> list[RunRecord]:
    """Every `summary.json` under `root` (fit writes `<run dir>/checkpoints/summary.json`)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--runs {root}: no such directory; fit writes runs to output_dir (default runs/)")
    records = []
    for path in sorted(root.rglob("summary.json")):
        try:
            data = json.loads(path.read_text())
            records.append(RunRecord(
                experiment=data["experiment"],
                seed=int(data["seed"]),
                config=data["config"],
                metrics={k: float(v) for k, v in data["metrics"].items() if v is not None},
                protocol=data.get("protocol", {}),
                protocols=data.get("protocols", {}),
                overrides=list(data.get("overrides", [])),
                steps=data.get("steps"),
                source=str(path),
                created=datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(),
            ))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise UserError(f"{path}: not a summary.json written by deeplab_lit.fit ({type(error).__name__}: "
                            f"{error}); delete it or re-run that fit") from None
    return records


def load_wandb(path: str, sweep: Optional[str] = None) -> tuple[list[RunRecord], Counter]:
    """Finished runs of a W&B project (or of one sweep in it); also counts the runs skipped by state."""
    import wandb

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
            ))
    except UserError:
        raise
    except Exception as error:  # network, authentication, unknown project: many types, one message
        text = " ".join(str(error).split())[:200]
        raise UserError(f"--wandb {path}{' --sweep ' + sweep if sweep else ''}: {type(error).__name__}: {text}; "
                        "check `wandb login` and the path, or build the report from --runs DIR") from None
    return records, skipped


# ---------------------------------------------------------------------------------------------------
# Aggregation


def dotted(config: dict, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def matches(record: RunRecord, table_row: Row) -> bool:
    return record.experiment in table_row.experiments and all(
        dotted(record.config, key) == value for key, value in table_row.where
    )


def one_per_seed(records: list[RunRecord]) -> tuple[list[RunRecord], int]:
    """The run kept for each seed (most steps, then newest), and how many were set aside."""
    best: dict[int, RunRecord] = {}
    for record in records:
        kept = best.get(record.seed)
        if kept is None or (record.steps or 0, record.created) > (kept.steps or 0, kept.created):
            best[record.seed] = record
    return [best[seed] for seed in sorted(best)], len(records) - len(best)


@dataclass
class Cell:
    """One row x column: the paper's number and ours over seeds, in %."""

    paper: Optional[float]
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> Optional[float]:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> Optional[float]:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def diff(self) -> Optional[float]:
        return None if self.mean is None or self.paper is None else self.mean - self.paper


@dataclass
class RowResult:
    row: Row
    cells: list[Cell]
    runs: list[RunRecord]
    duplicates: int
    protocol: str
    notes: list[str]


@dataclass
class Agreement:
    """Does our ordering of the rows (one column) agree with the paper's?"""

    column: str
    labels: list[str]
    paper: list[float]
    ours: list[float]

    @property
    def pairs(self) -> tuple[int, int]:
        """(agreeing, compared) over the row pairs the paper does not tie."""
        agree = total = 0
        for i, j in itertools.combinations(range(len(self.labels)), 2):
            paper_sign = _sign(self.paper[i] - self.paper[j])
            if paper_sign == 0:
                continue
            total += 1
            agree += paper_sign == _sign(self.ours[i] - self.ours[j])
        return agree, total

    @property
    def agrees(self) -> bool:
        agree, total = self.pairs
        return total > 0 and agree == total

    @property
    def kendall_tau(self) -> Optional[float]:
        from scipy.stats import kendalltau

        tau = kendalltau(self.paper, self.ours).statistic
        return None if tau is None or math.isnan(tau) else float(tau)

    def order(self, values: list[float]) -> str:
        ranked = sorted(zip(values, self.labels), key=lambda pair: -pair[0])
        text = ranked[0][1]
        for (previous, _), (value, label) in zip(ranked, ranked[1:]):
            text += (" = " if value == previous else " > ") + label
        return text

    def deltas(self) -> list[tuple[str, float, float]]:
        """(label, paper delta, our delta) of every row against the first one."""
        return [(label, p - self.paper[0], o - self.ours[0])
                for label, p, o in zip(self.labels[1:], self.paper[1:], self.ours[1:])]


@dataclass
class TableResult:
    table: Table
    rows: list[RowResult]
    agreements: list[Agreement]

    @property
    def rows_run(self) -> int:
        return sum(1 for r in self.rows if r.runs)


def _sign(value: float) -> int:
    return (value > 0) - (value < 0)


INFRASTRUCTURE = ("seed=", "wandb.", "output_dir=", "data.root=", "data.num_workers=", "data.eval_batch_size=",
                  "trainer.devices=", "trainer.num_nodes=", "trainer.accelerator=", "trainer.strategy=",
                  "trainer.enable_progress_bar=")


def recipe_changes(record: RunRecord, table_row: Row) -> list[str]:
    """Overrides that change the experiment's recipe (no-ops, the row's own keys and plumbing excluded)."""
    from deeplab_lit.config import parse_override

    own = experiment_config(record.experiment) if record.experiment in _known_experiments() else {}
    where = {key for key, _ in table_row.where}
    changes = []
    for override in record.overrides:
        if override.startswith(INFRASTRUCTURE):
            continue
        key, value = parse_override(override)
        if key not in where and dotted(own, key) != value:
            changes.append(override)
    return changes


@lru_cache(maxsize=1)
def _known_experiments() -> frozenset:
    from deeplab_lit.config import list_experiments

    return frozenset(list_experiments())


def aggregate_row(table: Table, table_row: Row, records: list[RunRecord]) -> RowResult:
    runs, duplicates = one_per_seed([r for r in records if matches(r, table_row)])
    cells = []
    for column in table.columns:
        metric = table_row.metric or column.metric
        paper_key = table_row.paper or column.paper
        paper = paper_number(table_row.paper_experiment or table_row.experiments[0], paper_key)
        values = [100.0 * r.metrics[metric] for r in runs if metric in r.metrics]
        cells.append(Cell(paper, values))
    first_metric = table_row.metric or table.columns[0].metric
    protocol = " / ".join(dict.fromkeys(describe_protocol(r, first_metric) for r in runs)) or ""
    return RowResult(table_row, cells, runs, duplicates, protocol, row_notes(table_row, runs, duplicates))


def row_notes(table_row: Row, runs: list[RunRecord], duplicates: int) -> list[str]:
    if not runs:
        return ["not run"]
    notes = []
    changes = sorted({change for r in runs for change in recipe_changes(r, table_row)})
    if changes:
        notes.append("overrides: " + ", ".join(changes))
    paper_section = experiment_config(table_row.paper_experiment or table_row.experiments[0])["paper"]
    if paper_section.get("requires"):
        inits = sorted({r.protocol.get("init_source", "?") for r in runs})
        if not any(init.startswith("file") for init in inits):
            notes.append(f"paper: {paper_section['requires'].split(':')[0]}; ours: {', '.join(inits)}")
    for r in runs:
        batch, paper_batch = r.protocol.get("effective_batch_size"), dotted(r.config, "data.batch_size")
        world = r.protocol.get("world_size", 1)
        if batch and paper_batch and world and world > 1 and batch != paper_batch:
            notes.append(f"effective batch {batch} ({world} GPUs x {paper_batch}), recipe {paper_batch}")
            break
    if duplicates:
        notes.append(f"{duplicates} more run(s) of the same seed(s) set aside")
    return notes


def describe_protocol(record: RunRecord, metric: str) -> str:
    """'train OS 16 · eval OS 8 · 6 scales 0.5-1.75 · flip · CRF · batch 16 · imagenet (torchvision)'."""
    p = eval_protocol(record, metric)
    parts = [f"train OS {record.protocol.get('train_output_stride', dotted(record.config, 'model.output_stride'))}",
             f"eval OS {p.get('output_stride')}"]
    scales = [float(s) for s in p.get("scales") or [1.0]]
    if scales != [1.0]:
        parts.append(f"{len(scales)} scales {min(scales):g}-{max(scales):g}")
    if p.get("flip"):
        parts.append("flip")
    if p.get("mode") == "slide":
        parts.append(f"slide {p.get('slide_crop', '')}/{p.get('slide_stride', '')}".rstrip("/"))
    if p.get("crf"):
        parts.append("CRF")
    if record.protocol.get("effective_batch_size"):
        parts.append(f"batch {record.protocol['effective_batch_size']}")
    if record.protocol.get("init_source"):
        parts.append(record.protocol["init_source"])
    return " · ".join(parts)


def eval_protocol(record: RunRecord, metric: str) -> dict:
    """The evaluation protocol behind `metric`: from summary.json, else rebuilt from the run's config."""
    key = metric.removeprefix("val/")
    if key in record.protocols:
        return record.protocols[key]
    name = key.removeprefix("mIoU").removeprefix("_")
    crf = name == "crf" or name.endswith("_crf")
    name = name.removesuffix("crf").rstrip("_")
    main = {
        "output_stride": record.protocol.get("eval_output_stride"),
        "scales": record.protocol.get("eval_scales", [1.0]),
        "flip": record.protocol.get("eval_flip", False),
        "mode": record.protocol.get("eval_mode", "whole"),
    }
    for extra in dotted(record.config, "eval.protocols") or []:
        if extra.get("name") == name:
            return {**main, **{k: v for k, v in extra.items() if k != "name"}, "crf": crf}
    return {**main, "crf": crf}


def build_report(records: list[RunRecord], tables: tuple[Table, ...] = TABLES) -> list[TableResult]:
    results = []
    for table in tables:
        rows = [aggregate_row(table, table_row, records) for table_row in table.rows]
        agreements = []
        for index, column in enumerate(table.columns if table.compare_rows else ()):
            both = [(r.row.label, r.cells[index].paper, r.cells[index].mean) for r in rows
                    if r.cells[index].paper is not None and r.cells[index].mean is not None]
            if len(both) >= 2:
                labels, paper, ours = map(list, zip(*both))
                agreements.append(Agreement(column.label, labels, paper, ours))
        results.append(TableResult(table, rows, agreements))
    return results


def unmatched(records: list[RunRecord], tables: tuple[Table, ...] = TABLES) -> list[RunRecord]:
    """Runs that no table row takes (e.g. the demo, or an override no paper row has)."""
    return [r for r in records if not any(matches(r, row_) for t in tables for row_ in t.rows)]


# ---------------------------------------------------------------------------------------------------
# Rendering: Markdown, HTML, figures


def fmt(value: Optional[float], signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def fmt_ours(cell: Cell, runs: int) -> str:
    if cell.mean is None:
        return "not run" if runs == 0 else "—"
    text = fmt(cell.mean) + (f" ± {cell.std:.2f}" if cell.std is not None else "")
    return text + (f" (n={cell.n})" if cell.n != runs else "")


def table_header(table: Table) -> list[str]:
    header = ["row", "experiment"]
    for column in table.columns:
        prefix = f"{column.label}: " if len(table.columns) > 1 else ""
        header += [f"{prefix}paper", f"{prefix}ours", f"{prefix}ours − paper"]
    return header + ["n", "protocol", "notes"]


def table_cells(result: RowResult) -> list[str]:
    cells = [result.row.label, ", ".join(result.row.experiments)]
    for cell in result.cells:
        cells += [fmt(cell.paper), fmt_ours(cell, len(result.runs)), fmt(cell.diff, signed=True)]
    return cells + [str(len(result.runs)), result.protocol or "—", "; ".join(result.notes)]


def agreement_lines(result: TableResult) -> list[str]:
    lines = []
    for agreement in result.agreements:
        agree, total = agreement.pairs
        tau = agreement.kendall_tau
        verdict = "agrees" if agreement.agrees else "differs"
        lines.append(
            f"Ordering ({agreement.column}): paper {agreement.order(agreement.paper)}; "
            f"ours {agreement.order(agreement.ours)} — {verdict} ({agree}/{total} pairs"
            + (f", Kendall τ = {tau:.2f})" if tau is not None else ")")
        )
        deltas = [f"{label}: paper {p:+.2f}, ours {o:+.2f}{'' if _sign(p) == _sign(o) else ' (sign differs)'}"
                  for label, p, o in agreement.deltas()]
        if deltas:
            lines.append(f"Deltas vs {agreement.labels[0]} ({agreement.column}): " + "; ".join(deltas))
    if len(result.table.columns) == 2:
        gains = []
        for r in result.rows:
            before, after = r.cells
            paper_gain = None if before.paper is None or after.paper is None else after.paper - before.paper
            ours_gain = None if before.mean is None or after.mean is None else after.mean - before.mean
            if ours_gain is not None:
                gains.append(f"{r.row.label}: paper {fmt(paper_gain, True)}, ours {fmt(ours_gain, True)}")
        if gains:
            lines.append(f"{result.table.columns[1].label} − {result.table.columns[0].label}: " + "; ".join(gains))
    return lines


def render_figure(result: TableResult) -> bytes:
    """Grouped bars: per row, paper (hatched) and ours (solid, ± std) for every column. PNG bytes.

    The ablations differ by a point or two, so the y axis starts 5 points below the lowest bar
    (rounded down to 5; the axis label says so) and every bar carries its value.
    """
    from matplotlib.figure import Figure

    table, rows = result.table, result.rows
    series = len(table.columns) * 2
    width = 0.8 / series
    figure = Figure(figsize=(min(16.0, max(6.0, 0.75 * len(rows) * len(table.columns) + 2.5)), 4.6), dpi=110,
                    layout="constrained")
    axes = figure.add_subplot()
    values = [v for r in rows for c in r.cells for v in (c.paper, c.mean) if v is not None]
    bottom = max(0.0, 5 * math.floor((min(values, default=5.0) - 5) / 5))
    for index, column in enumerate(table.columns):
        color = f"C{index}"
        suffix = f" · {column.label}" if len(table.columns) > 1 else ""
        offset = (2 * index - series / 2 + 0.5) * width
        paper = [(i + offset, r.cells[index].paper) for i, r in enumerate(rows) if r.cells[index].paper is not None]
        ours = [(i + offset + width, r.cells[index].mean, r.cells[index].std or 0.0)
                for i, r in enumerate(rows) if r.cells[index].mean is not None]
        if paper:
            x, y = zip(*paper)
            bars = axes.bar(x, [v - bottom for v in y], width, bottom=bottom, color="white", edgecolor=color,
                            hatch="///", label=f"paper{suffix}")
            axes.bar_label(bars, [f"{v:.1f}" for v in y], fontsize=6, rotation=90, padding=2)
        if ours:
            x, y, e = zip(*ours)
            bars = axes.bar(x, [v - bottom for v in y], width, bottom=bottom, yerr=e, color=color, capsize=2,
                            label=f"ours (mean ± std){suffix}")
            axes.bar_label(bars, [f"{v:.1f}" for v in y], fontsize=6, rotation=90, padding=2)
        for i, r in enumerate(rows):
            if r.cells[index].mean is None:
                axes.text(i + offset + width, bottom, " not run", rotation=90, ha="center", va="bottom",
                          fontsize=7, color="gray")
    axes.set_xlim(-0.5, len(rows) - 0.5)
    axes.set_ylim(bottom, min(100.0, max(values, default=95.0) + 6))
    axes.set_xticks(range(len(rows)), [_wrap(r.row.label) for r in rows], fontsize=8)
    axes.set_ylabel("mIoU (%)" + (f", axis from {bottom:g}" if bottom else ""))
    axes.set_title(table.title, fontsize=10)
    axes.grid(axis="y", alpha=0.3)
    if values:
        figure.legend(loc="outside lower center", ncols=series, fontsize=7, frameon=False)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _wrap(label: str, width: int = 16) -> str:
    words, lines = label.split(), [""]
    for word in words:
        if lines[-1] and len(lines[-1]) + len(word) + 1 > width:
            lines.append(word)
        else:
            lines[-1] = f"{lines[-1]} {word}".strip()
    return "\n".join(lines)


def render_markdown(results: list[TableResult], header: list[str], others: list[RunRecord]) -> str:
    out = ["# Paper vs ours: the DeepLab ablations", "", *header, ""]
    for result in results:
        table = result.table
        out += [f"## {table.title}", "", f"`{table.id}`: {result.rows_run}/{len(result.rows)} rows run.", ""]
        columns = table_header(table)
        out += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in table_cells(r)) + " |" for r in result.rows]
        out += [""] + [f"- {line}" for line in agreement_lines(result)]
        if table.note:
            out += [f"- {table.note}"]
        out += ["", f"![{table.title}](figures/{table.id}.png)", ""]
    if others:
        out += ["## Runs in no paper table", ""]
        out.append(markdown_table(["experiment", "seed", "val/mIoU", "overrides", "source"], [
            [r.experiment, str(r.seed), fmt(100 * r.metrics["val/mIoU"]) if "val/mIoU" in r.metrics else "—",
             ", ".join(r.overrides) or "—", r.source] for r in others]))
    return "\n".join(out) + "\n"


HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; font-size: 13px; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; vertical-align: top; }
td:first-child, td:nth-child(2), td:nth-last-child(-n+2), th { text-align: left; }
tr.not-run td { color: #999; }
li { font-size: 13px; } img { max-width: 100%; }
"""


def render_html(results: list[TableResult], header: list[str], figures: dict[str, bytes],
                others: list[RunRecord]) -> str:
    e = html.escape
    out = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>deeplab_lit: paper vs ours</title>",
           f"<style>{HTML_STYLE}</style></head><body>", "<h1>Paper vs ours: the DeepLab ablations</h1>"]
    out += [f"<p>{e(line)}</p>" for line in header]
    for result in results:
        table = result.table
        out.append(f"<h2 id='{e(table.id)}'>{e(table.title)}</h2>")
        out.append(f"<p><code>{e(table.id)}</code>: {result.rows_run}/{len(result.rows)} rows run.</p><table>")
        out.append("<tr>" + "".join(f"<th>{e(c)}</th>" for c in table_header(table)) + "</tr>")
        for r in result.rows:
            css = "" if r.runs else " class='not-run'"
            out.append(f"<tr{css}>" + "".join(f"<td>{e(c)}</td>" for c in table_cells(r)) + "</tr>")
        out.append("</table><ul>")
        out += [f"<li>{e(line)}</li>" for line in agreement_lines(result) + ([table.note] if table.note else [])]
        encoded = base64.b64encode(figures[table.id]).decode("ascii")
        out.append(f"</ul><img alt='{e(table.title)}' src='data:image/png;base64,{encoded}'>")
    if others:
        out.append("<h2>Runs in no paper table</h2><table><tr><th>experiment</th><th>seed</th><th>val/mIoU</th>"
                   "<th>overrides</th><th>source</th></tr>")
        for r in others:
            miou = fmt(100 * r.metrics["val/mIoU"]) if "val/mIoU" in r.metrics else "—"
            out.append(f"<tr><td>{e(r.experiment)}</td><td>{r.seed}</td><td>{miou}</td>"
                       f"<td>{e(', '.join(r.overrides) or '—')}</td><td>{e(r.source)}</td></tr>")
        out.append("</table>")
    return "\n".join(out + ["</body></html>"]) + "\n"


def write_report(results: list[TableResult], header: list[str], others: list[RunRecord], out_dir: Path) -> dict:
    """report.md, report.html and figures/<table>.png under `out_dir`; returns the paths."""
    out_dir = Path(out_dir)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    figures = {r.table.id: render_figure(r) for r in results}
    for table_id, png in figures.items():
        (out_dir / "figures" / f"{table_id}.png").write_bytes(png)
    markdown = render_markdown(results, header, others)
    page = render_html(results, header, figures, others)
    (out_dir / "report.md").write_text(markdown)
    (out_dir / "report.html").write_text(page)
    return {"markdown": out_dir / "report.md", "html": out_dir / "report.html", "figures": out_dir / "figures"}


WANDB_COLUMNS = ["table", "row", "experiments", "column", "metric", "paper", "ours_mean", "ours_std", "n",
                 "ours_minus_paper", "protocol", "notes"]


def wandb_rows(result: TableResult) -> list[list]:
    """Long format (one line per row x column), numbers as numbers, for W&B panels."""
    lines = []
    for r in result.rows:
        for column, cell in zip(result.table.columns, r.cells):
            metric = r.row.metric or column.metric
            protocol = " / ".join(dict.fromkeys(describe_protocol(run_, metric) for run_ in r.runs))
            lines.append([result.table.id, r.row.label, ", ".join(r.row.experiments), column.label, metric,
                          cell.paper, _round(cell.mean), _round(cell.std), cell.n, _round(cell.diff), protocol,
                          "; ".join(r.notes)])
    return lines


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 4)


def log_to_wandb(results: list[TableResult], target: str, out_dir: Path, sources: list[str],
                 mode: Optional[str] = None) -> str:
    """One W&B run (job_type "report") holding every table, its chart and the HTML page.

    `mode` (online/offline) is passed to wandb.init explicitly: wandb reads WANDB_MODE only when it is
    first set up in a process, so an environment change after an earlier run would be ignored."""
    import wandb

    entity, _, project = target.rpartition("/")
    wandb_run = wandb.init(project=project, entity=entity or None, job_type="report", name="paper-vs-ours",
                           config={"sources": sources}, dir=str(out_dir), mode=mode)
    for result in results:
        table_id = result.table.id
        wandb_run.log({
            f"report/{table_id}": wandb.Table(columns=WANDB_COLUMNS, data=wandb_rows(result)),
            f"report/{table_id}_chart": wandb.Image(str(out_dir / "figures" / f"{table_id}.png")),
        })
        for agreement in result.agreements:
            wandb_run.summary[f"report/{table_id}/ordering_agrees/{agreement.column}"] = agreement.agrees
    wandb_run.log({"report/page": wandb.Html((out_dir / "report.html").read_text(), data_is_not_path=True)})
    where = wandb_run.url or f"offline run in {Path(wandb_run.dir).parent} (upload it with `wandb sync`)"
    wandb_run.finish()
    return where


# ---------------------------------------------------------------------------------------------------
# Plan: sweep files -> tables, runs and estimated GPU hours


SWEEPS_DIR = Path(__file__).resolve().parent.parent / "sweeps"
VAL_IMAGES = {"voc": (1449, (375, 500)), "voc_aug": (1449, (375, 500)), "cityscapes": (500, (1024, 2048)),
              "synthetic": (64, (97, 97))}  # images and a typical size (VOC: 500x375 is the commonest)


def grid_points(sweep: dict) -> list[dict]:
    """Every parameter combination of a grid sweep (`value` = one value)."""
    parameters = sweep.get("parameters", {})
    names = list(parameters)
    choices = [spec["values"] if "values" in spec else [spec["value"]] for spec in parameters.values()]
    return [dict(zip(names, combination)) for combination in itertools.product(*choices)]


def point_config(point: dict):
    from deeplab_lit.config import load_experiment

    overrides = [f"{k}={json.dumps(v)}" for k, v in point.items() if k not in ("experiment", "wandb.mode")]
    return load_experiment(point["experiment"], overrides)


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


def run_cost_flops(cfg) -> dict:
    """Training and evaluation FLOPs of one run (multiply-adds x 2; backward = 2 x forward).

    Training: 3 x forward at the crop, batch x max_steps. Validation during training: the main
    protocol at the typical val image size every `val_check_interval` steps. Final evaluation: every
    protocol of the experiment (scales^2 x 2 with flip; sliding windows count their tiles). The CRF
    is not counted (it runs on the GPU in seconds per thousand images, or on CPUs).
    """
    from deeplab_lit.config import to_dict
    from deeplab_lit.inference import protocols_from_config
    from deeplab_lit.summary import num_classes_of

    model_yaml = yaml.safe_dump(to_dict(cfg)["model"])
    classes = num_classes_of(cfg)
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

    protocols = protocols_from_config(cfg)
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


def plan(sweeps_dir: Path = SWEEPS_DIR, tflops: float = 40.0) -> Plan:
    """Runs and estimated GPU hours per paper table (through its sweep file) and per sweep file."""
    from deeplab_lit.config import to_dict

    costed: dict[str, list[tuple[dict, RunRecord, float]]] = {}
    sweeps, distinct = [], {}
    for path in sorted(Path(sweeps_dir).glob("*.yaml")):
        sweep = yaml.safe_load(path.read_text())
        if sweep.get("program") != "deeplab_lit.fit":
            sweeps.append([path.name, f"{sweep.get('run_cap', '?')} ({sweep['method']})", "CRF only: minutes", "—"])
            continue
        costed[path.name] = []
        for point in grid_points(sweep):
            cfg = point_config(point)
            hours = sum(run_cost_flops(cfg).values()) / (tflops * 1e12) / 3600
            costed[path.name].append((point, RunRecord(cfg.name, cfg.seed, to_dict(cfg), {}), hours))
            # fit's run directory is a function of the experiment and the overrides (wandb.* aside)
            distinct[json.dumps({k: v for k, v in point.items() if k != "wandb.mode"}, sort_keys=True)] = hours
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


def markdown_table(header: list[str], lines: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *["| " + " | ".join(line) + " |" for line in lines]])


# ---------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str]):
    parser = argparse.ArgumentParser(prog="python -m deeplab_lit.report", description=__doc__.split("\n\n")[1])
    parser.add_argument("--runs", action="append", default=[], metavar="DIR",
                        help="run directories to read summary.json files from (repeatable)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read finished runs from this W&B project")
    parser.add_argument("--sweep", metavar="ID", help="only the runs of this sweep (with --wandb)")
    parser.add_argument("--out", default="report", metavar="DIR", help="output directory (default report/)")
    parser.add_argument("--wandb-mode", choices=["online", "offline"], default=None,
                        help="for --log-wandb (default: W&B's own, i.e. WANDB_MODE or online)")
    parser.add_argument("--log-wandb", nargs="?", const="", metavar="ENTITY/PROJECT",
                        help="log the tables to W&B (default: the --wandb project, else deeplab_lit)")
    parser.add_argument("--plan", action="store_true", help="print the sweeps' runs and GPU-hour estimates")
    parser.add_argument("--tflops", type=float, default=40.0,
                        help="--plan: sustained throughput assumed per GPU (default 40 TFLOP/s: A100-class, bf16)")
    parser.add_argument("--sweeps", default=str(SWEEPS_DIR), metavar="DIR", help="--plan: sweep files")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.plan:
        result = plan(Path(args.sweeps), args.tflops)
        header = ["ablation", "sweep files", "runs", "GPU h", "paper mIoU (before/after CRF)"]
        print(markdown_table(header, result.tables))
        print()
        print(markdown_table(["sweep file", "runs", "GPU h / run", "GPU h"], result.sweeps))
        print(f"\n{result.distinct_runs} runs over all sweep files (distinct run directories): "
              f"about {result.gpu_hours:.0f} GPU hours at {args.tflops:g} TFLOP/s sustained.")
        return 0
    if args.sweep and not args.wandb:
        raise UserError("--sweep ID needs --wandb ENTITY/PROJECT")
    if not args.runs and not args.wandb:
        raise UserError("give --runs DIR (local run directories) and/or --wandb ENTITY/PROJECT")
    records, sources, header = [], [], []
    for root in args.runs:
        local = load_local(Path(root))
        records += local
        sources.append(f"{root} ({len(local)} summary.json)")
    if args.wandb:
        remote, skipped = load_wandb(args.wandb, args.sweep)
        records += remote
        where = f"W&B {args.wandb}" + (f" sweep {args.sweep}" if args.sweep else "")
        extra = ", ".join(f"{n} {state}" for state, n in sorted(skipped.items()))
        sources.append(f"{where} ({len(remote)} finished runs" + (f"; skipped: {extra})" if extra else ")"))
    header.append("Sources: " + "; ".join(sources) + ".")
    header.append("mIoU in % on the validation set; ours = mean ± sample std over seeds (one run per seed); "
                  "ours − paper uses the mean.")
    results = build_report(records)
    others = unmatched(records)
    paths = write_report(results, header, others, Path(args.out))
    for result in results:
        verdicts = ", ".join(f"{a.column}: {'agrees' if a.agrees else 'differs'}" for a in result.agreements)
        print(f"{result.table.id:<30} {result.rows_run}/{len(result.rows)} rows run"
              + (f"; ordering {verdicts}" if verdicts else ""))
    print(f"wrote {paths['markdown']}, {paths['html']} and {len(results)} figures in {paths['figures']}")
    if args.log_wandb is not None:
        target = args.log_wandb or args.wandb or "deeplab_lit"
        print(f"logged to W&B: {log_to_wandb(results, target, Path(args.out), sources, args.wandb_mode)}")
    return 0


if __name__ == "__main__":
    run(main)
