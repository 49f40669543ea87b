"""The dashboard's figures, as PNG bytes (matplotlib's object API: no global state, no display).

- `bars`: paper vs ours per row, error bars = our 95 % intervals; the y axis starts at 0, or, when the
  numbers sit far above it, is visibly broken (a stub from 0, a gap and "//" marks, and the axis label
  names the break), never silently truncated.
- `claims`: every ordering the paper claims, as our difference with its interval beside the paper's
  difference, coloured by verdict; the zero line is what "significant" is read against.
- `heatmap`: per-class IoU across the rows of a table.
- `curves`: train/loss, val/mIoU and the learning rate over steps of the runs of a section.
- `qualitative`: images, their ground truth and each row's prediction side by side.
- `confusion`: a row's confusion matrix, normalised per ground-truth class.
"""
from __future__ import annotations

import io
import math
from typing import Optional, Sequence

import numpy as np

from deeplab_lit.palette import VOC_PALETTE as PALETTE

VERDICT_COLOURS = {"agrees, significant": "#1a9641", "agrees within noise": "#a6d96a", "disagrees": "#fdae61",
                   "disagrees, significant": "#d7191c", "differs, significant": "#2b83ba", "within noise": "#abdda4"}


def _figure(width: float, height: float, **kwargs):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained", **kwargs)


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def wrap(label: str, width: int = 16) -> str:
    words, lines = label.split(), [""]
    for word in words:
        if lines[-1] and len(lines[-1]) + len(word) + 1 > width:
            lines.append(word)
        else:
            lines[-1] = f"{lines[-1]} {word}".strip()
    return "\n".join(lines)


BREAK_FROM = 40.0  # break the axis only when every bar would otherwise be at least this tall and alike


def axis_break(values: Sequence[float]) -> float:
    """Where a broken axis resumes (0 = no break, the axis starts at 0): 5 points below the lowest value,
    rounded down to 5, when that is at least BREAK_FROM (VOC-level numbers, 60-80 %: the differences of a
    point would be invisible from 0)."""
    if not values:
        return 0.0
    bottom = 5 * math.floor((min(values) - 5) / 5)
    return float(bottom) if bottom >= BREAK_FROM else 0.0


def bars(result) -> bytes:
    """Grouped bars: per row, paper (hatched) and ours (solid, 95 % interval) for every column. PNG bytes."""
    return _png(bars_figure(result))


def bars_figure(result):
    """The figure of `bars`: one axes from 0, or two (the numbers' range above a stub from 0) with break marks."""
    table, rows = result.table, result.rows
    paper_shown = result.data is None
    series = len(table.columns) * (2 if paper_shown else 1)
    width = 0.8 / series
    values = [v for r in rows for c in r.cells for v in (c.paper, c.mean) if v is not None]
    lows = [c.stats.interval.low for r in rows for c in r.cells if c.stats is not None]
    highs = [c.stats.interval.high for r in rows for c in r.cells if c.stats is not None]
    bottom = axis_break(values + lows)
    top = min(100.0, max(values + highs, default=95.0) + 6)
    size = (min(16.0, max(6.5, 0.75 * len(rows) * len(table.columns) + 2.5)), 4.8)
    if bottom:
        figure = _figure(*size)
        grid = figure.add_gridspec(2, 1, height_ratios=[9, 1], hspace=0.06)
        axes = figure.add_subplot(grid[0])
        stub = figure.add_subplot(grid[1], sharex=axes)
    else:
        figure, stub = _figure(*size), None
        axes = figure.add_subplot()
    for index, column in enumerate(table.columns):
        colour = f"C{index}"
        suffix = f" · {column.label}" if len(table.columns) > 1 else ""
        group = 2 if paper_shown else 1
        offset = (group * index - series / 2 + 0.5) * width
        paper = [(i + offset, r.cells[index].paper) for i, r in enumerate(rows) if r.cells[index].paper is not None]
        ours_x = offset + (width if paper_shown else 0)
        ours = [(i + ours_x, r.cells[index]) for i, r in enumerate(rows) if r.cells[index].mean is not None]
        for target in (axes, stub):
            if target is None:
                continue
            if paper:
                x, y = zip(*paper)
                made = target.bar(x, y, width, color="white", edgecolor=colour, hatch="///",
                                  label=f"paper{suffix}" if target is axes else None)
                if target is axes:
                    axes.bar_label(made, [f"{v:.1f}" for v in y], fontsize=6, rotation=90, padding=2)
            if ours:
                x = [p for p, _ in ours]
                y = [c.mean for _, c in ours]
                errors = None
                if target is axes and any(c.stats for _, c in ours):
                    errors = np.array([[c.mean - c.stats.interval.low if c.stats else 0.0 for _, c in ours],
                                       [c.stats.interval.high - c.mean if c.stats else 0.0 for _, c in ours]])
                    errors = np.clip(errors, 0.0, None)
                target.bar(x, y, width, yerr=errors, color=colour, capsize=2,
                           label=f"ours (mean, 95 % interval){suffix}" if target is axes else None)
                if target is axes:  # the value above its error bar
                    for position, (_, cell) in zip(x, ours):
                        top_of = cell.stats.interval.high if cell.stats else cell.mean
                        axes.annotate(f"{cell.mean:.1f}", (position, max(top_of, cell.mean)), xytext=(0, 2),
                                      textcoords="offset points", ha="center", va="bottom", fontsize=6, rotation=90)
        if paper_shown:
            for i, r in enumerate(rows):
                if r.cells[index].mean is None:
                    axes.text(i + ours_x, bottom, " not run", rotation=90, ha="center", va="bottom", fontsize=7,
                              color="gray")
    axes.set_xlim(-0.5, len(rows) - 0.5)
    axes.set_ylim(bottom, top)
    axes.grid(axis="y", alpha=0.3)
    axes.set_title(wrap(table.title, int(11 * size[0])), fontsize=10)
    labels = [wrap(r.row.label) for r in rows]
    if stub is not None:
        stub.set_ylim(0, (top - bottom) / 9)
        stub.set_yticks([0])
        axes.spines["bottom"].set_visible(False)
        stub.spines["top"].set_visible(False)
        axes.tick_params(axis="x", bottom=False, labelbottom=False)
        stub.set_xticks(range(len(rows)), labels, fontsize=8)
        marks = dict(marker=[(-1, -0.5), (1, 0.5)], markersize=10, linestyle="none", color="k", mec="k", mew=1,
                     clip_on=False)
        axes.plot([0, 1], [0, 0], transform=axes.transAxes, **marks)
        stub.plot([0, 1], [1, 1], transform=stub.transAxes, **marks)
        axes.set_ylabel(f"mIoU (%) · axis broken: 0 … {bottom:g}")
    else:
        axes.set_xticks(range(len(rows)), labels, fontsize=8)
        axes.set_ylabel("mIoU (%), axis from 0")
    if values:
        figure.legend(loc="outside lower center", ncols=series if series <= 2 or size[0] > 10 else 2, fontsize=7,
                      frameon=False)
    return figure


def claims(result) -> Optional[bytes]:
    """Our difference (point, 95 % interval) and the paper's (×) for every claim with runs on both sides."""
    shown = [c for c in result.claims if c.ours is not None]
    if not shown:
        return None
    height = 1.2 + 0.32 * len(shown)
    figure = _figure(8.0, height)
    axes = figure.add_subplot()
    for y, claim in enumerate(reversed(shown)):
        colour = VERDICT_COLOURS.get(claim.verdict, "#888888")
        if claim.difference is not None:
            low, high = claim.interval.low, claim.interval.high
            axes.plot([low, high], [y, y], color=colour, linewidth=3, solid_capstyle="butt")
        axes.plot([claim.ours], [y], "o", color="black", markersize=4)
        if claim.paper is not None:
            axes.plot([claim.paper], [y], "x", color="#444444", markersize=6)
    axes.axvline(0.0, color="black", linewidth=0.8)
    labels = [_claim_label(c, result.data is None) for c in reversed(shown)]
    axes.set_yticks(range(len(shown)), labels, fontsize=7)
    axes.set_ylim(-0.7, len(shown) - 0.3)
    paper_text = ("difference, mIoU points, higher − lower as the paper ranks them\n"
                  "× paper, ● ours, bar: our 95 % interval")
    axes.set_xlabel(paper_text if result.data is None else "difference, mIoU points\n● ours, bar: 95 % interval",
                    fontsize=7)
    axes.grid(axis="x", alpha=0.3)
    from matplotlib.patches import Patch

    used = [v for v in VERDICT_COLOURS if any(c.verdict == v for c in shown)]
    if used:
        figure.legend(handles=[Patch(color=VERDICT_COLOURS[v], label=v) for v in used], loc="outside lower center",
                      ncols=len(used), fontsize=7, frameon=False)
    axes.set_title("Orderings the paper claims: our differences" if result.data is None else
                   "Differences between rows", fontsize=9)
    return _png(figure)


def _claim_label(claim, paper: bool = True) -> str:
    where = "" if claim.column in ("columns", "mIoU") else f" ({claim.column})"
    text = f"{claim.higher} {'>' if paper else 'vs'} {claim.lower}{where}"
    return text if len(text) <= 70 else text[:67] + "..."


def heatmap(labels: list[str], class_names: list[str], values: np.ndarray, title: str) -> bytes:
    """Per-class IoU (%), rows x classes; NaN (class absent) grey."""
    from matplotlib import colormaps

    rows, classes = values.shape
    figure = _figure(min(16.0, 2.8 + 0.55 * classes), 1.2 + 0.32 * rows)
    axes = figure.add_subplot()
    cmap = colormaps["viridis"].with_extremes(bad="#dddddd")
    image = axes.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=100, aspect="auto")
    axes.set_xticks(range(classes), class_names, rotation=45, ha="right", fontsize=7)
    axes.set_yticks(range(rows), [wrap(label, 40) for label in labels], fontsize=7)
    if classes <= 25:
        for i in range(rows):
            for j in range(classes):
                if not math.isnan(values[i, j]):
                    axes.text(j, i, f"{values[i, j]:.0f}", ha="center", va="center", fontsize=6,
                              color="white" if values[i, j] < 60 else "black")
    figure.colorbar(image, ax=axes, label="IoU (%)", fraction=0.03)
    axes.set_title(wrap(title, int(9 * min(16.0, 2.8 + 0.55 * classes))), fontsize=9)
    return _png(figure)


def curves(runs: list[tuple[str, dict]], title: str) -> Optional[bytes]:
    """train/loss, val/mIoU and the learning rate over steps, one line per run; None if none was logged."""
    from deeplab_lit.report.curves import CURVES

    if not any(found for _, found in runs):
        return None
    figure = _figure(12.0, 3.2)
    panels = figure.subplots(1, len(CURVES))
    for axes, (panel, _) in zip(panels, CURVES):
        for index, (label, found) in enumerate(runs):
            points = found.get(panel)
            if points:
                steps, values = zip(*points)
                scale = 100.0 if panel == "val/mIoU" else 1.0
                axes.plot(steps, [scale * v for v in values], color=f"C{index % 10}", linewidth=1,
                          marker="o" if len(points) < 20 else None, markersize=2, label=label)
        axes.set_title(panel + (" (%)" if panel == "val/mIoU" else ""), fontsize=9)
        axes.set_xlabel("step", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.grid(alpha=0.3)
        if panel == "learning rate":
            axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    handles, labels = panels[0].get_legend_handles_labels()
    if not handles:
        for axes in panels[1:]:
            handles, labels = axes.get_legend_handles_labels()
            if handles:
                break
    figure.legend(handles, labels, loc="outside lower center", ncols=min(4, max(1, len(labels))), fontsize=7,
                  frameon=False)
    figure.suptitle(title, fontsize=9)
    return _png(figure)


def colour(labels: np.ndarray) -> np.ndarray:
    """Label map -> RGB with the VOC palette; ignored (255) white."""
    rgb = PALETTE[np.asarray(labels, np.uint8)]
    rgb[np.asarray(labels) == 255] = 255
    return rgb


def qualitative(images: list[tuple[str, np.ndarray, np.ndarray, list[Optional[np.ndarray]]]], columns: list[str],
                title: str) -> bytes:
    """One line per image: the image, its ground truth, then each column's prediction (blank if missing)."""
    count = 2 + len(columns)
    height, width = images[0][1].shape[:2]
    cell = 1.9
    figure = _figure(min(18.0, cell * count * max(0.8, width / height)), 0.5 + cell * len(images))
    grid = figure.subplots(len(images), count, squeeze=False)
    headers = ["image", "ground truth", *[wrap(c, 22) for c in columns]]
    for line, (name, image, truth, predictions) in enumerate(images):
        panels = [image, colour(truth), *[colour(p[: truth.shape[0], : truth.shape[1]]) if p is not None else None
                                          for p in predictions]]
        for index, (axes, panel) in enumerate(zip(grid[line], panels)):
            axes.set_xticks([])
            axes.set_yticks([])
            if panel is None:
                axes.text(0.5, 0.5, "no prediction\nsaved", ha="center", va="center", fontsize=7, color="gray",
                          transform=axes.transAxes)
            else:
                axes.imshow(panel, interpolation="nearest")
            if line == 0:
                axes.set_title(headers[index], fontsize=7)
            if index == 0:
                axes.set_ylabel(name, fontsize=7)
    figure.suptitle(title, fontsize=9)
    return _png(figure)


def confusion(matrix: np.ndarray, class_names: list[str], title: str) -> bytes:
    """Rows = ground truth, columns = prediction, each row divided by its ground-truth pixels (%)."""
    matrix = np.asarray(matrix, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = 100.0 * matrix / matrix.sum(1, keepdims=True)
    classes = matrix.shape[0]
    if len(class_names) != classes:
        class_names = [str(i) for i in range(classes)]
    size = min(14.0, 2.5 + 0.42 * classes)
    figure = _figure(size + 1.2, size)
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(normalised), cmap="Blues", vmin=0, vmax=100)
    axes.set_xticks(range(classes), class_names, rotation=45, ha="right", fontsize=7)
    axes.set_yticks(range(classes), class_names, fontsize=7)
    axes.set_xlabel("prediction", fontsize=8)
    axes.set_ylabel("ground truth", fontsize=8)
    if classes <= 21:
        for i in range(classes):
            for j in range(classes):
                value = normalised[i, j]
                if not math.isnan(value) and value >= 0.5:
                    axes.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=6,
                              color="white" if value > 50 else "black")
    figure.colorbar(image, ax=axes, label="% of the ground-truth class's pixels", fraction=0.04)
    axes.set_title(wrap(title, int(9 * size)), fontsize=9)
    return _png(figure)
