"""The dashboard as data: its sections (paper tables, the same tables on other data, runs in no table),
and every figure of each section, built once and shared by the Markdown page, the HTML page and W&B.

Figures are keyed by their file name under `figures/`:
    <table>.png                  paper vs ours bars (the name the report has always used)
    <table>.claims.png           the paper's orderings: our differences with intervals
    <table>.heatmap.png          per-class IoU across the table's rows
    <table>.curves.png           training curves of the table's runs
    <table>.qualitative.png      images, ground truth and each row's prediction
    <table>.confusion-<n>.png    row n's confusion matrix (on demand: --confusion)
    other/<experiment>.curves.png  runs in no paper table
Sections on other data (e.g. the synthetic set) prefix their figures with `<data>--`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from deeplab_lit.errors import UserError
from deeplab_lit.records import safe_name
from deeplab_lit.report import figures
from deeplab_lit.report.aggregate import TableResult, build_report, other_data, unmatched
from deeplab_lit.report.sources import RunRecord
from deeplab_lit.report.stats import Bootstrap
from deeplab_lit.report.tables import TABLES


@dataclass
class Section:
    """One table's section: its result, figure names, and notes said beside the figures."""

    result: TableResult
    anchor: str
    figures: dict[str, str] = field(default_factory=dict)  # kind -> file name
    notes: dict[str, str] = field(default_factory=dict)  # kind -> why the figure is missing / a remark
    confusions: list[tuple[str, str]] = field(default_factory=list)  # (title, file name)


@dataclass
class Dashboard:
    header: list[str]
    sections: list[Section]  # paper tables, on the papers' image sets
    other: dict[str, list[Section]]  # image set -> the tables filled on it
    others: list[RunRecord]  # runs in no paper table
    other_curves: dict[str, str] = field(default_factory=dict)  # experiment -> figure file name
    other_notes: dict[str, str] = field(default_factory=dict)
    bootstrap: Bootstrap = field(default_factory=Bootstrap)
    images: dict[str, bytes] = field(default_factory=dict)  # file name -> PNG bytes

    @property
    def all_sections(self) -> list[Section]:
        return [*self.sections, *(s for group in self.other.values() for s in group)]

    @property
    def run_sections(self) -> list[Section]:
        return [s for s in self.sections if s.result.rows_run]

    @property
    def idle_sections(self) -> list[Section]:
        """Paper tables without a run on the paper's image set."""
        return [s for s in self.sections if not s.result.rows_run]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def build_dashboard(records: list[RunRecord], header: list[str], *, bootstrap: Optional[Bootstrap] = None,
                    qualitative_images: int = 3, confusion: tuple[str, ...] = (), tables=TABLES) -> Dashboard:
    bootstrap = bootstrap or Bootstrap()
    sections = [Section(r, r.table.id) for r in build_report(records, tables, bootstrap=bootstrap)]
    other = {}
    for data in other_data(records, tables):
        prefix = slug(data)
        other[data] = [Section(r, f"{prefix}--{r.table.id}")
                       for r in build_report(records, tables, data=data, bootstrap=bootstrap)]
    dashboard = Dashboard(header, sections, other, unmatched(records, tables), bootstrap=bootstrap)
    requests = _confusion_requests(confusion, tables)
    for section in dashboard.all_sections:
        _section_figures(dashboard, section, qualitative_images, requests)
    by_experiment: dict[str, list[RunRecord]] = {}
    for run in dashboard.others:
        by_experiment.setdefault(run.experiment, []).append(run)
    for experiment, runs in by_experiment.items():
        name = f"other/{safe_name(experiment)}.curves.png"
        png = figures.curves([(r.label, r.curves()) for r in runs], f"{experiment}: training curves")
        if png is None:
            dashboard.other_notes[experiment] = "no curve logged"
        else:
            dashboard.images[name] = png
            dashboard.other_curves[experiment] = name
    return dashboard


def _confusion_requests(requests: tuple[str, ...], tables) -> dict[str, Optional[set[str]]]:
    """--confusion TABLE[/ROW] (ROW: 1-based number or label) or all -> {table id: row labels or None = all}."""
    wanted: dict[str, Optional[set[str]]] = {}
    ids = {t.id: t for t in tables}
    for request in requests:
        if request == "all":
            return {t.id: None for t in tables}
        table_id, _, row = request.partition("/")
        if table_id not in ids:
            raise UserError(f"--confusion {request}: no table '{table_id}'; tables: {', '.join(ids)}")
        if not row:
            wanted[table_id] = None
            continue
        labels = [r.label for r in ids[table_id].rows]
        label = labels[int(row) - 1] if row.isdigit() and 1 <= int(row) <= len(labels) else row
        if label not in labels:
            raise UserError(f"--confusion {request}: {table_id} has rows 1-{len(labels)}: {'; '.join(labels)}")
        if wanted.get(table_id, set()) is not None:
            wanted.setdefault(table_id, set()).add(label)
    return wanted


def _section_figures(dashboard: Dashboard, section: Section, qualitative_images: int,
                     confusion: dict[str, Optional[set[str]]]) -> None:
    result, base = section.result, section.anchor
    put = (lambda kind, name, png: (dashboard.images.__setitem__(name, png), section.figures.__setitem__(kind, name)))
    if not result.rows_run:
        return  # the page lists the paper's numbers of tables not run yet, without figures
    put("bars", f"{base}.png", figures.bars(result))
    claims = figures.claims(result)
    if claims is not None:
        put("claims", f"{base}.claims.png", claims)
    heat = heatmap_values(result)
    if heat is not None:
        labels, classes, values = heat
        put("heatmap", f"{base}.heatmap.png", figures.heatmap(labels, classes, values,
                                                                f"{result.table.title}: IoU per class (%)"))
    else:
        section.notes["heatmap"] = "no per-class IoU recorded"
    runs = list({id(run): (row, run) for row in result.rows for run in row.runs}.values())
    without = {}
    for row, run in runs:
        if run.per_image() is None:
            why = run.per_image_note or "no per-image record"
            without.setdefault(why, []).append(f"{row.row.label} · seed {run.seed}")
    if without:
        section.notes["intervals"] = "; ".join(f"{', '.join(labels)}: {why}" for why, labels in without.items())
    found = [(f"{row.row.label} · seed {run.seed}", run.curves()) for row, run in runs]
    png = figures.curves(found, f"{result.table.title}: training curves")
    missing = [label for label, curves in found if not curves]
    if png is not None:
        put("curves", f"{base}.curves.png", png)
    if missing:
        section.notes["curves"] = "no curve logged: " + ", ".join(missing)
    if qualitative_images > 0:
        panel, note = qualitative_panel(result, qualitative_images)
        if panel is not None:
            put("qualitative", f"{base}.qualitative.png", panel)
        if note:
            section.notes["qualitative"] = note
    if result.table.id in confusion:
        wanted = confusion[result.table.id]
        for number, row in enumerate(result.rows, 1):
            if wanted is not None and row.row.label not in wanted:
                continue
            for column, cell in zip(result.table.columns, row.cells):
                matrix, classes = _confusion(cell)
                suffix = f" · {column.label}" if len(result.table.columns) > 1 else ""
                title = f"{row.row.label}{suffix}"
                if matrix is None:
                    section.confusions.append((title, ""))
                    continue
                name = f"{base}.confusion-{number}{'-' + slug(column.label) if suffix else ''}.png"
                dashboard.images[name] = figures.confusion(matrix, classes, f"{result.table.title}: {title} "
                                                           f"(summed over {len(cell.runs)} run(s))")
                section.confusions.append((title, name))


def heatmap_values(result: TableResult) -> Optional[tuple[list[str], list[str], np.ndarray]]:
    """Rows (row · column) x classes of mean per-class IoU (%) over the runs; None if nothing recorded."""
    labels, lines, classes = [], [], []
    for row in result.rows:
        for column, cell in zip(result.table.columns, row.cells):
            key = cell.metric.removeprefix("val/")
            found = [run.per_class.get(key) for run in cell.runs if run.per_class.get(key)]
            if not found:
                continue
            classes = classes or list(cell.runs[0].class_names or found[0])
            line = []
            for name in classes:
                values = [f[name] for f in found if f.get(name) is not None and f[name] == f[name]]
                line.append(100.0 * float(np.mean(values)) if values else float("nan"))
            suffix = f" · {column.label}" if len(result.table.columns) > 1 else ""
            labels.append(f"{row.row.label}{suffix}")
            lines.append(line)
    if not lines or not classes:
        return None
    width = len(classes)
    return labels, classes, np.array([line[:width] + [float("nan")] * (width - len(line)) for line in lines])


def _confusion(cell) -> tuple[Optional[np.ndarray], list[str]]:
    counts = cell.counts()
    if not counts or any(c.confusion is None for c in counts):
        return None, []
    return sum(c.confusion for c in counts), list(cell.runs[0].class_names)


def qualitative_panel(result: TableResult, count: int) -> tuple[Optional[bytes], str]:
    """The first `count` saved images (in the first run's order) with ground truth and every cell's prediction."""
    cells = [(f"{row.row.label}" + (f" · {column.label}" if len(result.table.columns) > 1 else ""), cell)
             for row in result.rows for column, cell in zip(result.table.columns, row.cells) if cell.runs]
    cells = cells[:8]
    saved = []
    for label, cell in cells:
        run = min(cell.runs, key=lambda r: r.seed)
        saved.append((label, run, run.predictions(cell.metric.removeprefix("val/"))))
    stems = next((list(found) for _, _, found in saved if found), [])
    if not stems:
        return None, "no predictions saved (eval.qualitative_images = 0, or runs evaluated before it existed)"
    run = next(run for _, run, found in saved if found)
    samples, note = load_samples(run, stems[:count])
    if not samples:
        return None, note
    images = []
    for stem, (name, image, truth) in samples.items():
        predictions = []
        for _, _, found in saved:
            path = found.get(stem)
            predictions.append(_read_labels(path) if path else None)
        images.append((name, image, truth, predictions))
    title = f"{result.table.title}: first {len(images)} validation image(s), prediction of each row's first seed"
    return figures.qualitative(images, [label for label, _, _ in saved], title), note


def _read_labels(path: Path) -> Optional[np.ndarray]:
    from PIL import Image

    try:
        with Image.open(path) as png:
            return np.asarray(png if png.mode in ("P", "L") else png.convert("L")).copy()
    except OSError:
        return None


def load_samples(run: RunRecord, stems: list[str]) -> tuple[dict[str, tuple[str, np.ndarray, np.ndarray]], str]:
    """{stem: (name, RGB image, ground truth)} from the dataset root recorded in the run's config;
    ({}, why) when that data is not on this machine."""
    import dataclasses

    from datamodules import build_datamodule
    from deeplab_lit.config import DataConfig

    data = run.config.get("data") if isinstance(run.config, dict) else None
    if not isinstance(data, dict):
        return {}, "no data section in the run's config"
    known = {f.name for f in dataclasses.fields(DataConfig)}
    try:
        datamodule = build_datamodule(DataConfig(**{k: v for k, v in data.items() if k in known}))
        if not Path(datamodule.root).is_dir():
            return {}, f"images not shown: the run's data ({datamodule.root}) is not on this machine"
        dataset = datamodule.eval_dataset("val")
        position = {safe_name(sample.name): i for i, sample in enumerate(dataset.samples)}
        found = {}
        for stem in stems:
            if stem in position:
                image, truth = dataset.load(position[stem])
                found[stem] = (dataset.samples[position[stem]].name, image, truth)
    except (UserError, OSError, TypeError, ValueError) as error:
        return {}, f"images not shown: the run's data is not readable here ({str(error)[:160]})"
    if not found:
        return {}, "images not shown: the saved predictions name no image of the run's data here"
    return found, ""
