"""Rendering: Markdown, a self-contained HTML page, one figure per table, and W&B tables."""
from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Optional

from deeplab_lit.report.aggregate import Cell, RowResult, TableResult, _sign, describe_protocol
from deeplab_lit.report.sources import RunRecord
from deeplab_lit.report.tables import Table

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




def markdown_table(header: list[str], lines: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *["| " + " | ".join(line) + " |" for line in lines]])
