"""Aggregation: runs matched to table rows, one run per seed, mean ± std over seeds, the difference from
the paper, intervals over images and seeds (`stats`), and for every ordering the paper claims whether
ours agrees, significantly or within noise.

A run is compared with a paper row only when it was evaluated on the row's own image set (VOC val for
the VOC tables, Cityscapes val for the Cityscapes ones): a run of a paper experiment on the synthetic
set fills the same table in a section of its own, without paper numbers (`build_report(data=...)`).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Optional

from deeplab_lit.report.sources import RunRecord, eval_set
from deeplab_lit.report.stats import Bootstrap, CellStats, Difference, cell_stats, difference, verdict
from deeplab_lit.report.tables import TABLES, Row, Table, experiment_config, paper_number

WITHIN = 1.0  # "within ±1 mIoU of the paper"

def dotted(config: dict, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


TIMM_PREFIX = "timm:"


def matches(record: RunRecord, table_row: Row) -> bool:
    """The run is of the row's experiment(s) and has the row's defining values (whatever its data). A `timm:`
    backbone swapped into a paper experiment is another network family, not the paper's row; other overrides
    (e.g. ResNet-50 for a quick run) keep the row and are named in its notes."""
    if record.experiment not in table_row.experiments:
        return False
    backbone = str(dotted(record.config, "model.backbone") or "")
    own = str(dotted(experiment_config(record.experiment), "model.backbone") or "")
    if backbone.startswith(TIMM_PREFIX) and not own.startswith(TIMM_PREFIX):
        return False
    return all(dotted(record.config, key) == value for key, value in table_row.where)


def row_eval_set(table_row: Row) -> str:
    """The image set the paper evaluated the row on (its experiment's data as shipped)."""
    return eval_set(experiment_config(table_row.experiments[0])["data"]["name"])


def takes(record: RunRecord, table_row: Row, data: Optional[str] = None) -> bool:
    """Whether the row takes the run: on the paper's image set (data None), or on the image set `data`."""
    return matches(record, table_row) and record.eval_set == (data or row_eval_set(table_row))


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
    """One row x column: the paper's number and ours over seeds, in %; intervals from the runs' per-image
    records (`stats` is None when a run has none)."""

    paper: Optional[float]
    values: list[float]
    metric: str = ""
    runs: list[RunRecord] = field(default_factory=list)  # the runs behind `values`, in the same order
    stats: Optional[CellStats] = None  # in %

    def counts(self) -> Optional[list]:
        """Every run's per-image counts of this cell's metric, or None if any run lacks them."""
        key = self.metric.removeprefix("val/")
        found = [(r.per_image() or {}).get(key) for r in self.runs]
        return found if found and all(c is not None for c in found) else None

    @property
    def within(self) -> Optional[bool]:
        """|ours − paper| <= 1 point (None when either is missing)."""
        return None if self.diff is None else abs(self.diff) <= WITHIN + 1e-9

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
class Claim:
    """An ordering the paper claims (two of its numbers differ), or on other data a contrast between two
    cells, and what our runs say; numbers in points."""

    column: str  # the column compared (row pairs), or "columns" (the two columns of one row)
    higher: str  # what the paper ranks higher (on other data: the first in table order)
    lower: str
    paper: Optional[float]  # paper higher − lower (> 0); None on other data
    ours: Optional[float]  # our mean higher − lower
    difference: Optional[Difference]  # paired bootstrap (and seeds), points
    verdict: str
    note: str = ""

    @property
    def interval(self):
        return self.difference.interval if self.difference else None


@dataclass
class TableResult:
    table: Table
    rows: list[RowResult]
    agreements: list[Agreement]
    claims: list[Claim] = field(default_factory=list)
    data: Optional[str] = None  # None: the paper's image set; else the image set of this section's runs

    @property
    def rows_run(self) -> int:
        return sum(1 for r in self.rows if r.runs)

    @property
    def rows_within(self) -> int:
        """Rows run whose every cell with a paper number is within ±1 point of it."""
        count = 0
        for r in self.rows:
            compared = [c.within for c in r.cells if c.within is not None]
            count += bool(compared) and all(compared)
        return count

    @property
    def rows_compared(self) -> int:
        return sum(1 for r in self.rows if any(c.within is not None for c in r.cells))


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


def aggregate_row(table: Table, table_row: Row, records: list[RunRecord], data: Optional[str] = None,
                  bootstrap: Optional[Bootstrap] = None) -> RowResult:
    runs, duplicates = one_per_seed([r for r in records if takes(r, table_row, data)])
    cells = []
    for column in table.columns:
        metric = table_row.metric or column.metric
        paper_key = table_row.paper or column.paper
        paper = None if data else paper_number(table_row.paper_experiment or table_row.experiments[0], paper_key)
        with_metric = [r for r in runs if metric in r.metrics]
        cell = Cell(paper, [100.0 * r.metrics[metric] for r in with_metric], metric, with_metric)
        counts = cell.counts()
        if counts and bootstrap is not None:
            found = cell_stats(bootstrap, counts)
            cell.stats = found.scaled(100.0) if found else None
        cells.append(cell)
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


def build_report(records: list[RunRecord], tables: tuple[Table, ...] = TABLES, *, data: Optional[str] = None,
                 bootstrap: Optional[Bootstrap] = None) -> list[TableResult]:
    """Every table, paper vs ours on the paper's image sets (`data` None), or ours alone on the image
    set `data` (tables with at least one run). `bootstrap` (default: 2,000 resamples, seed 0) gives
    the intervals; runs without a per-image record get none."""
    bootstrap = bootstrap or Bootstrap()
    results = []
    for table in tables:
        rows = [aggregate_row(table, table_row, records, data, bootstrap) for table_row in table.rows]
        if data:  # other data: the rows that ran, under a title naming the data
            rows = [r for r in rows if r.runs]
            if not rows:
                continue
            title = table.title
            for paper_set in ("VOC val", "Cityscapes val"):
                title = title.replace(paper_set, data)
            table = dataclasses.replace(table, title=title if title != table.title else f"{title} ({data})")
        agreements = []
        for index, column in enumerate(table.columns if table.compare_rows else ()):
            both = [(r.row.label, r.cells[index].paper, r.cells[index].mean) for r in rows
                    if r.cells[index].paper is not None and r.cells[index].mean is not None]
            if len(both) >= 2:
                labels, paper, ours = map(list, zip(*both))
                agreements.append(Agreement(column.label, labels, paper, ours))
        results.append(TableResult(table, rows, agreements, table_claims(table, rows, bootstrap, data), data))
    return results


def table_claims(table: Table, rows: list[RowResult], bootstrap: Bootstrap, data: Optional[str]) -> list[Claim]:
    """Every ordering the table's paper numbers claim: each pair of rows (per column) whose numbers differ,
    when the rows' order is the ablation's claim; and, in two-column tables (before/after CRF, eval OS 16/8),
    the two columns of each row. On other data (`data`): the same pairs among the rows that ran."""
    pairs = []  # (column label, (row, column index) higher, (row, column index) lower)
    if table.compare_rows:
        for index, column in enumerate(table.columns):
            for a, b in itertools.combinations(rows, 2):
                pairs.append((column.label, (a, index), (b, index)))
    if len(table.columns) == 2:
        for r in rows:
            pairs.append(("columns", (r, 1), (r, 0)))
    claims = []
    for column, (row_a, i), (row_b, j) in pairs:
        a, b = row_a.cells[i], row_b.cells[j]
        label = (lambda r, k: f"{r.row.label} · {table.columns[k].label}" if column == "columns" else r.row.label)
        if data:
            if a.mean is None or b.mean is None:
                continue
        else:
            if a.paper is None or b.paper is None or a.paper == b.paper:
                continue
            if a.paper < b.paper:
                (row_a, i, a), (row_b, j, b) = (row_b, j, b), (row_a, i, a)
        claims.append(_claim(column, label(row_a, i), label(row_b, j), a, b, bootstrap))
    return claims


def _claim(column: str, higher: str, lower: str, a: Cell, b: Cell, bootstrap: Bootstrap) -> Claim:
    paper = None if a.paper is None or b.paper is None else a.paper - b.paper
    if a.mean is None or b.mean is None:
        return Claim(column, higher, lower, paper, None, None, "not run", "")
    ours = a.mean - b.mean
    counts_a, counts_b = a.counts(), b.counts()
    found = None
    note = ""
    if counts_a and counts_b:
        paired = [r.source for r in a.runs] == [r.source for r in b.runs]
        found = difference(bootstrap, counts_a, counts_b, paired_runs=paired)
        found = found.scaled(100.0) if found else None
        if found and found.combined is None:
            note = "images only (seed spread needs two seeds per row)"
    if found is not None:
        ours = found.estimate  # the same number, on the images both rows cover
    if paper is None:
        text = ("differs, significant" if not found.interval.contains(0.0) else "within noise") if found else \
            "no interval"
    else:
        text = verdict(paper, ours, found.interval if found else None)
    return Claim(column, higher, lower, paper, ours, found, text, note)


def other_data(records: list[RunRecord], tables: tuple[Table, ...] = TABLES) -> list[str]:
    """Image sets of runs that fill a table row but were not evaluated on the paper's set (e.g. synthetic)."""
    found = {r.eval_set for r in records for t in tables for row_ in t.rows
             if matches(r, row_) and r.eval_set != row_eval_set(row_)}
    return sorted(found)


def unmatched(records: list[RunRecord], tables: tuple[Table, ...] = TABLES) -> list[RunRecord]:
    """Runs that no table row takes on any data (e.g. the demo, timm: backbones, an override no paper row has)."""
    return [r for r in records if not any(matches(r, row_) for t in tables for row_ in t.rows)]


