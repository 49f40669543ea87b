"""Aggregation: runs matched to table rows, one run per seed, mean ± std over seeds, the difference from
the paper, and whether the ablation's ordering agrees with the paper's.
"""
from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

from deeplab_lit.report.sources import RunRecord
from deeplab_lit.report.tables import TABLES, Row, Table, experiment_config, paper_number

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


def recipe_changes(record: RunRecord, table_row: Row) -> list[str]:
    """Overrides that change the experiment's recipe (no-ops, the row's own keys and plumbing excluded)."""
    from deeplab_lit.config import INFRASTRUCTURE, key_role, parse_override

    own = experiment_config(record.experiment) if record.experiment in _known_experiments() else {}
    where = {key for key, _ in table_row.where}
    changes = []
    for override in record.overrides:
        key, value = parse_override(override)
        if key == "seed" or key_role(key) == INFRASTRUCTURE:
            continue
        if key not in where and dotted(own, key) != value:
            changes.append(override)
    return changes


@lru_cache(maxsize=1)
def _known_experiments() -> frozenset:
    from deeplab_lit.config import experiment_names

    return frozenset(experiment_names())


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


