"""Rendering the dashboard: Markdown (figures as files), a self-contained HTML page (figures embedded), and
the same tables and figures in W&B."""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Optional

from deeplab_lit.report import figures as figure_maker
from deeplab_lit.report.aggregate import Cell, Claim, RowResult, TableResult, _sign, describe_protocol
from deeplab_lit.report.dashboard import Dashboard, Section
from deeplab_lit.report.stats import AGREES_SIGNIFICANT, AGREES_WITHIN_NOISE, DISAGREES, DISAGREES_SIGNIFICANT
from deeplab_lit.report.tables import Table

TITLE = "Paper vs ours: the DeepLab ablations"
READING = [
    "For every ordering a paper table claims (two of its numbers "
    "differ, e.g. ASPP-L > ASPP-S), *ours Δ* is our mean difference in mIoU points, oriented as the paper ranks "
    "the two, and the interval is its 95 % interval: a paired bootstrap over the validation images (both rows "
    "resampled with the same images), widened by the seed spread when both rows have two or more seeds "
    "(method *images + seeds*).",
    "*agrees, significant*: our difference has the paper's sign and its interval excludes 0. "
    "*agrees within noise*: the paper's sign, but the interval contains 0, so this evaluation cannot tell the "
    "two rows apart. *disagrees*: our difference is 0 or of the other sign, within noise. "
    "*disagrees, significant*: the other sign, and the interval excludes 0. *no interval*: a run lacks its "
    "per-image record (`per_image.npz`).",
    "*ours* is the mean ± sample std over seeds (one run per seed); *95 % interval* is that mean's interval "
    "(one seed: percentile bootstrap over images; several: mean ± 1.96 √(s²/n + image variance)); *spread* is "
    "the spread of one run, seeds ⊕ images = √(seed std² + mean bootstrap variance) (law of total variance).",
]


def fmt(value: Optional[float], signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def fmt_ours(cell: Cell, runs: int) -> str:
    if cell.mean is None:
        return "not run" if runs == 0 else "—"
    text = fmt(cell.mean) + (f" ± {cell.std:.2f}" if cell.std is not None else "")
    return text + (f" (n={cell.n})" if cell.n != runs else "")


def fmt_interval(interval, signed: bool = False) -> str:
    return "—" if interval is None else f"[{fmt(interval.low, signed)}, {fmt(interval.high, signed)}]"


def fmt_spread(cell: Cell) -> str:
    stats = cell.stats
    if stats is None:
        return "—"
    if stats.seed_std is None:
        return f"— ⊕ {stats.image_std:.2f}"
    return f"{stats.seed_std:.2f} ⊕ {stats.image_std:.2f} = {stats.spread:.2f}"


def table_header(table: Table, paper: bool = True) -> list[str]:
    header = ["row", "experiment"]
    for column in table.columns:
        prefix = f"{column.label}: " if len(table.columns) > 1 else ""
        header += ([f"{prefix}paper"] if paper else []) + [f"{prefix}ours", f"{prefix}95 % interval"] + \
            ([f"{prefix}ours − paper"] if paper else []) + [f"{prefix}spread: seeds ⊕ images"]
    return header + ["n", "protocol", "notes"]


def table_cells(result: RowResult, paper: bool = True) -> list[str]:
    cells = [result.row.label, ", ".join(result.row.experiments)]
    for cell in result.cells:
        interval = cell.stats.interval if cell.stats else None
        cells += ([fmt(cell.paper)] if paper else []) + [fmt_ours(cell, len(result.runs)), fmt_interval(interval)] + \
            ([fmt(cell.diff, signed=True)] if paper else []) + [fmt_spread(cell)]
    return cells + [str(len(result.runs)), result.protocol or "—", "; ".join(result.notes)]


CLAIM_HEADER = ["paper claims", "column", "paper Δ", "ours Δ", "95 % interval", "significance"]
CONTRAST_HEADER = ["rows", "column", "ours Δ", "95 % interval", "significance"]


def claim_cells(claim: Claim, paper: bool = True) -> list[str]:
    interval = claim.interval
    method = f" ({interval.method})" if interval is not None else ""
    verdict = claim.verdict + (f"; {claim.note}" if claim.note and claim.verdict != "not run" else "")
    name = f"{claim.higher} {'>' if paper else 'vs'} {claim.lower}"
    column = "" if claim.column == "columns" else claim.column
    return [name, column, *([fmt(claim.paper, True)] if paper else []), fmt(claim.ours, True),
            fmt_interval(interval, True) + method, verdict]


def shown_claims(result: TableResult) -> tuple[list[Claim], int]:
    """The claims with runs on both sides, and how many others there are (not run)."""
    shown = [c for c in result.claims if c.verdict != "not run"]
    return shown, len(result.claims) - len(shown)


def verdict_counts(claims: list[Claim]) -> dict[str, int]:
    counts = {AGREES_SIGNIFICANT: 0, AGREES_WITHIN_NOISE: 0, DISAGREES: 0, DISAGREES_SIGNIFICANT: 0, "untested": 0}
    for claim in claims:
        key = claim.verdict if claim.verdict in counts else "untested"
        counts[key] += 1
    return counts


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
                paper_part = f"paper {fmt(paper_gain, True)}, ours " if result.data is None else ""
                gains.append(f"{r.row.label}: {paper_part}{fmt(ours_gain, True)}")
        if gains:
            lines.append(f"{result.table.columns[1].label} − {result.table.columns[0].label}: " + "; ".join(gains))
    return lines


def render_figure(result: TableResult) -> bytes:
    """The table's bar chart (paper vs ours, 95 % intervals, an honest axis); PNG bytes."""
    return figure_maker.bars(result)


def markdown_table(header: list[str], lines: list[list[str]]) -> str:
    escape = (lambda text: str(text).replace("|", "\\|"))
    return "\n".join(["| " + " | ".join(escape(h) for h in header) + " |", "|" + "---|" * len(header),
                      *["| " + " | ".join(escape(c) for c in line) + " |" for line in lines]])


# ------------------------------------------------------------------------------------------ overview


def overview_rows(dashboard: Dashboard) -> list[list[str]]:
    lines = []
    for section in dashboard.sections:
        result = section.result
        counts = verdict_counts(result.claims)
        lines.append([result.table.title, f"{result.rows_run}/{len(result.rows)}",
                      f"{result.rows_within}/{result.rows_compared}" if result.rows_compared else "—",
                      *(str(counts[k]) for k in counts)])
    return lines


OVERVIEW_HEADER = ["table", "rows run", "rows within ±1 of the paper", "agrees, significant", "agrees within noise",
                   "disagrees", "disagrees, significant", "claims not tested"]


def overview_lines(dashboard: Dashboard) -> list[str]:
    results = [s.result for s in dashboard.sections]
    ran = [r for r in results if r.rows_run]
    claims = [c for r in results for c in r.claims]
    counts = verdict_counts(claims)
    tested = len(claims) - counts["untested"]
    within = sum(r.rows_within for r in results)
    compared = sum(r.rows_compared for r in results)
    lines = [f"{len(ran)} of {len(results)} paper tables have runs on the papers' image sets"
             + (f": {', '.join(r.table.id for r in ran)}." if ran else "."),
             f"{within} of {compared} rows compared are within ±1 mIoU of the paper.",
             f"{len(claims)} orderings claimed by the papers; {tested} tested: {counts[AGREES_SIGNIFICANT]} reproduced "
             f"and significant, {counts[AGREES_WITHIN_NOISE]} agree within noise, {counts[DISAGREES]} disagree within "
             f"noise, {counts[DISAGREES_SIGNIFICANT]} disagree significantly."]
    significant = [f"{c.higher} > {c.lower}" + ("" if c.column in ("columns", "mIoU") else f" ({c.column})")
                   for r in results for c in r.claims if c.verdict == AGREES_SIGNIFICANT]
    if significant:
        lines.append("Reproduced and significant: " + "; ".join(significant) + ".")
    for data, sections in dashboard.other.items():
        runs = {id(run) for s in sections for row in s.result.rows for run in row.runs}
        lines.append(f"{len(runs)} run(s) on {data} fill {len(sections)} table(s) in their own section, never "
                     "compared with the papers' numbers.")
    if dashboard.others:
        lines.append(f"{len(dashboard.others)} run(s) in no paper table (e.g. the demo, timm: backbones).")
    lines.append(f"Intervals: {dashboard.bootstrap.resamples:,} bootstrap resamples of the images, seed "
                 f"{dashboard.bootstrap.seed}, {100 * dashboard.bootstrap.level:g} %.")
    return lines


def toc(dashboard: Dashboard) -> list[tuple[str, str, int]]:
    """(anchor, title, level) of every section."""
    entries = [("reading", "How to read the significance column", 1)]
    entries += [(s.anchor, s.result.table.title, 1) for s in dashboard.run_sections]
    for data, sections in dashboard.other.items():
        entries.append((f"data-{sections[0].anchor.split('--')[0]}", f"On {data} (not compared with the papers)", 1))
        entries += [(s.anchor, s.result.table.title, 2) for s in sections]
    if dashboard.others:
        entries.append(("others", "Runs in no paper table", 1))
    if dashboard.idle_sections:
        entries.append(("not-run", "Paper tables not run yet", 1))
        entries += [(s.anchor, s.result.table.title, 2) for s in dashboard.idle_sections]
    return entries


IDLE_TEXT = ("No run of these tables on the paper's image set yet: the paper's numbers, and how many orderings "
             "each table claims.")


def idle_rows(section: Section) -> list[list[str]]:
    lines = []
    for r in section.result.rows:
        lines.append([r.row.label, ", ".join(r.row.experiments), *[fmt(c.paper) for c in r.cells]])
    return lines


def idle_header(section: Section) -> list[str]:
    table = section.result.table
    return ["row", "experiment", *[f"paper: {c.label}" if len(table.columns) > 1 else "paper" for c in table.columns]]


def other_rows(dashboard: Dashboard) -> list[list[str]]:
    lines = []
    for r in dashboard.others:
        counts = (r.per_image() or {}).get("mIoU")
        interval = dashboard.bootstrap.interval(counts).scaled(100.0) if counts else None
        lines.append([r.experiment, str(r.seed), r.eval_set,
                      fmt(100 * r.metrics["val/mIoU"]) if "val/mIoU" in r.metrics else "—", fmt_interval(interval),
                      str(r.steps if r.steps is not None else "—"), ", ".join(r.overrides) or "—", r.source])
    return lines


OTHER_HEADER = ["experiment", "seed", "data", "val/mIoU", "95 % interval", "steps", "overrides", "source"]
RUN_HEADER = ["row", "column", "seed", "mIoU", "95 % interval (images)", "images", "source"]


def run_rows(dashboard: Dashboard, result: TableResult) -> list[list[str]]:
    """Every run of every cell with its own interval over images (per run and protocol)."""
    lines = []
    for r in result.rows:
        for column, cell in zip(result.table.columns, r.cells):
            key = cell.metric.removeprefix("val/")
            for run, value in zip(cell.runs, cell.values):
                counts = (run.per_image() or {}).get(key)
                interval = dashboard.bootstrap.interval(counts).scaled(100.0) if counts else None
                lines.append([r.row.label, column.label, str(run.seed), fmt(value), fmt_interval(interval),
                              str(len(counts.names)) if counts else "—", run.source])
    return lines

FIGURE_TEXT = {"intervals": "no interval", "bars": "paper vs ours (error bars: our 95 % intervals)",
               "claims": "orderings: our differences",
               "heatmap": "IoU per class across the rows", "curves": "training curves",
               "qualitative": "qualitative: image, ground truth, each row's prediction"}


# ------------------------------------------------------------------------------------------ Markdown


def render_markdown(dashboard: Dashboard) -> str:
    out = [f"# {TITLE}", "", *dashboard.header, ""]
    out += ['<a id="overview"></a>', "## Overview", "", *[f"- {line}" for line in overview_lines(dashboard)], ""]
    out += [markdown_table(OVERVIEW_HEADER, overview_rows(dashboard)), "", "## Contents", ""]
    for anchor, title, level in toc(dashboard):
        out.append(f"{'  ' * (level - 1)}- [{title}](#{anchor})")
    out.append("")
    out += ['<a id="reading"></a>', "## How to read the significance column", "", *[f"{p}\n" for p in READING]]
    for section in dashboard.run_sections:
        out += _markdown_section(dashboard, section, 2)
    for data, sections in dashboard.other.items():
        out += [f'<a id="data-{sections[0].anchor.split("--")[0]}"></a>',
                f"## On {data} (not compared with the papers)", "",
                f"Runs of paper experiments evaluated on {data}: the papers' numbers are for other images, so "
                "these tables show ours alone, with the differences between rows.", ""]
        for section in sections:
            out += _markdown_section(dashboard, section, 3)
    if dashboard.others:
        out += ['<a id="others"></a>', "## Runs in no paper table", "",
                markdown_table(OTHER_HEADER, other_rows(dashboard)), ""]
        for experiment in dict.fromkeys(r.experiment for r in dashboard.others):
            if experiment in dashboard.other_curves:
                out += [f"![{experiment}: training curves](figures/{dashboard.other_curves[experiment]})", ""]
            else:
                out += [f"- {experiment}: {dashboard.other_notes.get(experiment, 'no curve logged')}", ""]
    if dashboard.idle_sections:
        out += ['<a id="not-run"></a>', "## Paper tables not run yet", "", IDLE_TEXT, ""]
        for section in dashboard.idle_sections:
            result = section.result
            out += [f'<a id="{section.anchor}"></a>', f"### {result.table.title}", "",
                    f"`{result.table.id}`: {len(result.rows)} rows, {len(result.claims)} orderings claimed"
                    + (f"; {result.table.note.rstrip('.')}" if result.table.note else "") + ".", "",
                    markdown_table(idle_header(section), idle_rows(section)), ""]
    return "\n".join(out) + "\n"


def _markdown_section(dashboard: Dashboard, section: Section, level: int) -> list[str]:
    result, table = section.result, section.result.table
    paper = result.data is None
    out = [f'<a id="{section.anchor}"></a>', f"{'#' * level} {table.title}", "",
           f"`{table.id}`: {result.rows_run}/{len(result.rows)} rows run"
           + (f"; {result.rows_within}/{result.rows_compared} within ±1 of the paper."
              if paper and result.rows_compared else "."), ""]
    out.append(markdown_table(table_header(table, paper), [table_cells(r, paper) for r in result.rows]))
    out.append("")
    claims, not_run = shown_claims(result)
    if claims:
        header = CLAIM_HEADER if paper else CONTRAST_HEADER
        out += [markdown_table(header, [claim_cells(c, paper) for c in claims]), ""]
    out += [f"- {line}" for line in agreement_lines(result) + ([table.note] if table.note else [])]
    if not_run:
        out.append(f"- {not_run} more ordering(s) claimed by the paper involve rows not run.")
    out += ["", "Runs, each with its own interval:", "", markdown_table(RUN_HEADER, run_rows(dashboard, result))]
    out.append("")
    for kind, name in section.figures.items():
        out += [f"![{table.title}: {FIGURE_TEXT[kind]}](figures/{name})", ""]
    for kind, note in section.notes.items():
        out += [f"- {FIGURE_TEXT.get(kind, kind)}: {note}"]
    if section.notes:
        out.append("")
    for title, name in section.confusions:
        out += [f"![confusion matrix: {title}](figures/{name})" if name else
                f"- confusion matrix {title}: no per-image record", ""]
    return out


# ------------------------------------------------------------------------------------------ HTML

HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1250px; color: #222; padding: 0 1em; }
table { border-collapse: collapse; font-size: 13px; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; vertical-align: top; }
td:first-child, td:nth-child(2), td:nth-last-child(-n+2), th { text-align: left; }
tr.not-run td { color: #999; }
li, p.note { font-size: 13px; } img { max-width: 100%; display: block; margin: 0.6em 0; }
nav ul { columns: 2; font-size: 13px; } h2 { border-bottom: 1px solid #ddd; margin-top: 2em; }
td.v-agrees-significant { background: #c7e9c0; } td.v-agrees-within-noise { background: #edf8e9; }
td.v-disagrees { background: #fee6ce; } td.v-disagrees-significant { background: #fcbba1; }
td.v-differs-significant { background: #c6dbef; }
details { font-size: 13px; margin: 0.4em 0; }
.legend { font-size: 13px; background: #f7f7f7; padding: 0.5em 1em; border-left: 3px solid #999; }
"""


def _cell_class(text: str) -> str:
    verdict = text.split(";")[0].strip()
    return "v-" + verdict.replace(",", "").replace(" ", "-") if verdict else ""


def _html_table(header: list[str], lines: list[list[str]], row_classes: Optional[list[str]] = None,
                verdict_column: Optional[int] = None) -> str:
    e = html.escape
    out = ["<table>", "<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
    for index, line in enumerate(lines):
        css = f" class='{row_classes[index]}'" if row_classes and row_classes[index] else ""
        cells = []
        for position, cell in enumerate(line):
            klass = f" class='{_cell_class(cell)}'" if position == verdict_column else ""
            cells.append(f"<td{klass}>{e(cell)}</td>")
        out.append(f"<tr{css}>" + "".join(cells) + "</tr>")
    return "\n".join(out + ["</table>"])


def _markdown_inline(text: str) -> str:
    """**bold**, *italic* and `code` of the fixed texts above, as HTML."""
    import re

    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    text = re.sub(r"\*(.+?)\*", r"<i>\1</i>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def render_html(dashboard: Dashboard) -> str:
    e = html.escape
    out = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>deeplab_lit: paper vs ours</title>",
           f"<style>{HTML_STYLE}</style></head><body>", f"<h1>{e(TITLE)}</h1>"]
    out += [f"<p class='note'>{e(line)}</p>" for line in dashboard.header]
    out.append("<h2 id='overview'>Overview</h2><ul>")
    out += [f"<li>{e(line)}</li>" for line in overview_lines(dashboard)]
    out.append("</ul>")
    out.append(_html_table(OVERVIEW_HEADER, overview_rows(dashboard)))
    out.append("<nav><b>Contents</b><ul>")
    for anchor, title, level in toc(dashboard):
        style = " style='margin-left:1.2em'" if level > 1 else ""
        out.append(f"<li{style}><a href='#{e(anchor)}'>{e(title)}</a></li>")
    out.append("</ul></nav>")
    out.append("<h2 id='reading'>How to read the significance column</h2><div class='legend'>")
    out += [f"<p>{_markdown_inline(p)}</p>" for p in READING]
    out.append("</div>")
    for section in dashboard.run_sections:
        out += _html_section(dashboard, section, "h2")
    for data, sections in dashboard.other.items():
        out.append(f"<h2 id='data-{e(sections[0].anchor.split('--')[0])}'>On {e(data)} (not compared with the "
                   "papers)</h2>")
        out.append(f"<p class='note'>Runs of paper experiments evaluated on {e(data)}: the papers' numbers are for "
                   "other images, so these tables show ours alone, with the differences between rows.</p>")
        for section in sections:
            out += _html_section(dashboard, section, "h3")
    if dashboard.others:
        out.append("<h2 id='others'>Runs in no paper table</h2>")
        out.append(_html_table(OTHER_HEADER, other_rows(dashboard)))
        for experiment in dict.fromkeys(r.experiment for r in dashboard.others):
            if experiment in dashboard.other_curves:
                out.append(_img(dashboard, dashboard.other_curves[experiment], f"{experiment}: training curves"))
            else:
                out.append(f"<p class='note'>{e(experiment)}: {e(dashboard.other_notes.get(experiment, ''))}</p>")
    if dashboard.idle_sections:
        out += ["<h2 id='not-run'>Paper tables not run yet</h2>", f"<p class='note'>{e(IDLE_TEXT)}</p>"]
        for section in dashboard.idle_sections:
            result = section.result
            out.append(f"<h3 id='{e(section.anchor)}'>{e(result.table.title)}</h3>")
            out.append(f"<p class='note'><code>{e(result.table.id)}</code>: {len(result.rows)} rows, "
                       f"{len(result.claims)} orderings claimed"
                       + (f"; {e(result.table.note.rstrip('.'))}" if result.table.note else "") + ".</p>")
            out.append(_html_table(idle_header(section), idle_rows(section)))
    return "\n".join(out + ["</body></html>"]) + "\n"


def _img(dashboard: Dashboard, name: str, alt: str) -> str:
    encoded = base64.b64encode(dashboard.images[name]).decode("ascii")
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{encoded}'>"


def _html_section(dashboard: Dashboard, section: Section, tag: str) -> list[str]:
    e = html.escape
    result, table = section.result, section.result.table
    paper = result.data is None
    out = [f"<{tag} id='{e(section.anchor)}'>{e(table.title)}</{tag}>",
           f"<p class='note'><code>{e(table.id)}</code>: {result.rows_run}/{len(result.rows)} rows run"
           + (f"; {result.rows_within}/{result.rows_compared} within ±1 of the paper."
              if paper and result.rows_compared else ".") + "</p>"]
    out.append(_html_table(table_header(table, paper), [table_cells(r, paper) for r in result.rows],
                           ["" if r.runs else "not-run" for r in result.rows]))
    claims, not_run = shown_claims(result)
    if claims:
        header = CLAIM_HEADER if paper else CONTRAST_HEADER
        out.append(_html_table(header, [claim_cells(c, paper) for c in claims], verdict_column=len(header) - 1))
    runs = run_rows(dashboard, result)
    out.append(f"<details><summary>{len(runs)} run(s), each with its own interval</summary>"
               + _html_table(RUN_HEADER, runs) + "</details>")
    lines = agreement_lines(result) + ([table.note] if table.note else [])
    if not_run:
        lines.append(f"{not_run} more ordering(s) claimed by the paper involve rows not run.")
    lines += [f"{FIGURE_TEXT.get(kind, kind)}: {note}" for kind, note in section.notes.items()]
    if lines:
        out.append("<ul>" + "".join(f"<li>{e(line)}</li>" for line in lines) + "</ul>")
    for kind, name in section.figures.items():
        out.append(_img(dashboard, name, f"{table.title}: {FIGURE_TEXT[kind]}"))
    for title, name in section.confusions:
        out.append(_img(dashboard, name, f"confusion matrix: {title}") if name else
                   f"<p class='note'>confusion matrix {e(title)}: no per-image record</p>")
    return out


def write_report(dashboard: Dashboard, out_dir: Path) -> dict:
    """report.md, report.html and figures/*.png under `out_dir`; returns the paths."""
    out_dir = Path(out_dir)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    for stale in (out_dir / "figures").rglob("*.png"):  # a previous report's figures of tables since changed
        if stale.relative_to(out_dir / "figures").as_posix() not in dashboard.images:
            stale.unlink()
    for name, png in dashboard.images.items():
        (out_dir / "figures" / name).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / "figures" / name).write_bytes(png)
    (out_dir / "report.md").write_text(render_markdown(dashboard))
    (out_dir / "report.html").write_text(render_html(dashboard))
    return {"markdown": out_dir / "report.md", "html": out_dir / "report.html", "figures": out_dir / "figures"}


# ------------------------------------------------------------------------------------------ W&B

WANDB_COLUMNS = ["table", "row", "experiments", "column", "metric", "paper", "ours_mean", "ours_std", "n",
                 "ours_minus_paper", "protocol", "notes", "ci_low", "ci_high", "ci_method", "image_std", "spread",
                 "data"]
WANDB_CLAIM_COLUMNS = ["table", "higher", "lower", "column", "paper_diff", "ours_diff", "ci_low", "ci_high",
                       "ci_method", "verdict", "note", "data"]


def wandb_rows(result: TableResult) -> list[list]:
    """Long format (one line per row x column), numbers as numbers, for W&B panels."""
    lines = []
    for r in result.rows:
        for column, cell in zip(result.table.columns, r.cells):
            metric = r.row.metric or column.metric
            protocol = " / ".join(dict.fromkeys(describe_protocol(run_, metric) for run_ in r.runs))
            stats = cell.stats
            lines.append([result.table.id, r.row.label, ", ".join(r.row.experiments), column.label, metric,
                          cell.paper, _round(cell.mean), _round(cell.std), cell.n, _round(cell.diff), protocol,
                          "; ".join(r.notes), _round(stats.interval.low if stats else None),
                          _round(stats.interval.high if stats else None), stats.interval.method if stats else None,
                          _round(stats.image_std if stats else None), _round(stats.spread if stats else None),
                          result.data or "paper's"])
    return lines


def wandb_claims(result: TableResult) -> list[list]:
    return [[result.table.id, c.higher, c.lower, c.column, _round(c.paper), _round(c.ours),
             _round(c.interval.low if c.interval else None), _round(c.interval.high if c.interval else None),
             c.interval.method if c.interval else None, c.verdict, c.note, result.data or "paper's"]
            for c in result.claims]


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 4)


def log_to_wandb(dashboard: Dashboard, target: str, out_dir: Path, sources: list[str],
                 mode: Optional[str] = None) -> str:
    """One W&B run (job_type "report") holding the overview, every table with its claims, every figure and
    the HTML page.

    `mode` (online/offline) is passed to wandb.init explicitly: wandb reads WANDB_MODE only when it is
    first set up in a process, so an environment change after an earlier run would be ignored."""
    import wandb

    entity, _, project = target.rpartition("/")
    wandb_run = wandb.init(project=project, entity=entity or None, job_type="report", name="paper-vs-ours",
                           config={"sources": sources, "bootstrap_resamples": dashboard.bootstrap.resamples,
                                   "bootstrap_seed": dashboard.bootstrap.seed}, dir=str(out_dir), mode=mode)
    wandb_run.log({"report/overview": wandb.Table(columns=OVERVIEW_HEADER, data=overview_rows(dashboard))})
    for section in dashboard.all_sections:
        result = section.result
        key = f"report/{section.anchor}"
        logged = {key: wandb.Table(columns=WANDB_COLUMNS, data=wandb_rows(result))}
        if result.claims:
            logged[f"{key}_claims"] = wandb.Table(columns=WANDB_CLAIM_COLUMNS, data=wandb_claims(result))
        if result.rows_run:
            logged[f"{key}_runs"] = wandb.Table(columns=RUN_HEADER, data=run_rows(dashboard, result))
        for kind, name in section.figures.items():
            logged[f"{key}_{'' if kind == 'bars' else kind + '_'}chart"] = wandb.Image(str(out_dir / "figures" / name))
        for index, (_, name) in enumerate(section.confusions):
            if name:
                logged[f"{key}_confusion_{index}"] = wandb.Image(str(out_dir / "figures" / name))
        wandb_run.log(logged)
        for agreement in result.agreements:
            wandb_run.summary[f"report/{section.anchor}/ordering_agrees/{agreement.column}"] = agreement.agrees
        for verdict, count in verdict_counts(result.claims).items():
            wandb_run.summary[f"report/{section.anchor}/claims/{verdict}"] = count
    if dashboard.others:
        wandb_run.log({"report/others": wandb.Table(columns=OTHER_HEADER, data=other_rows(dashboard))})
        for experiment, name in dashboard.other_curves.items():
            wandb_run.log({f"report/others/{experiment}_curves": wandb.Image(str(out_dir / "figures" / name))})
    wandb_run.log({"report/page": wandb.Html((out_dir / "report.html").read_text(), data_is_not_path=True)})
    where = wandb_run.url or f"offline run in {Path(wandb_run.dir).parent} (upload it with `wandb sync`)"
    wandb_run.finish()
    return where
