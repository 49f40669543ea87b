"""The paper catalogue (`docs/papers.md`), generated from experiments/: every paper row this project
implements, its recipe and the paper's numbers, grouped by the paper tables of the report.

    python -m deeplab_lit.report --catalogue docs/papers.md

A test regenerates it and compares, so the file never drifts from the experiments.
"""
from __future__ import annotations

from deeplab_lit.report.tables import TABLES


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def recipe(config) -> str:
    """The defining values of a row, short."""
    model, data, optim = config.model, config.data, config.optim
    parts = [f"{model.generation}", model.backbone, f"OS {model.output_stride}", f"head {model.head}"]
    if model.head in ("fc", "atrous_classifier", "aspp") and model.aspp_rates:
        parts.append(f"rates {_fmt(model.aspp_rates)}")
    if model.head == "fc":
        parts.append(f"fc6 {model.fc6_kernel}x{model.fc6_kernel} x{model.fc6_width}")
    if model.backbone != "vgg16":
        parts.append(f"MG {_fmt(model.multi_grid)}")
    if model.cascade_blocks:
        parts.append(f"block{4 + model.cascade_blocks}")
    if model.msc_features:
        parts.append("MSc")
    if model.msc_scales:
        parts.append(f"MSC {_fmt(model.msc_scales)}")
    if model.generation == "v3plus":
        parts.append(f"decoder {model.decoder_channels}/{model.decoder_convs}x3x3")
    if model.separable:
        parts.append("separable 3x3 (SC)")
    parts.append(f"BN {model.bn}" if model.backbone != "vgg16" else "no BN")
    parts += [f"crop {data.crop_size}", f"batch {data.batch_size}", f"lr {optim.lr:g} {optim.schedule}",
              f"{config.trainer['max_steps']:,} steps", f"scale {_fmt(data.scale_range)}", f"init {model.pretrained}"]
    return ", ".join(parts)


def paper_numbers(config) -> str:
    paper = config.paper
    numbers = []
    if paper.miou is not None:
        numbers.append(f"{paper.miou:g}")
    if paper.miou_crf is not None:
        numbers.append(f"{paper.miou_crf:g} (CRF)")
    numbers += [f"{key.removeprefix('val/')} {value:g}" for key, value in paper.metrics.items()]
    return " · ".join(numbers) or "—"


def render_catalogue() -> str:
    from deeplab_lit.config import experiment_names, load_experiment

    configs = {name: load_experiment(name) for name in experiment_names()}
    lines = ["# The paper rows this project implements", "",
             "Generated from `experiments/` by `python -m deeplab_lit.report --catalogue docs/papers.md`; "
             "do not edit by hand. Numbers are mIoU (%) on PASCAL VOC 2012 val unless the table says "
             "Cityscapes. `python -m deeplab_lit.fit --experiment <id>` trains a row.", ""]
    for table in TABLES:
        lines += [f"## {table.title}", "", "| row | experiment | paper | recipe |", "|---|---|---|---|"]
        for row in table.rows:
            for name in row.experiments:
                config = configs[name]
                if row.where:  # the row's own values, e.g. the swept backbone
                    config = load_experiment(name, [f"{key}={_fmt(value)}" for key, value in row.where])
                where = "; ".join(f"{key}={_fmt(value)}" for key, value in row.where if key != "crf.enabled")
                lines.append(f"| {row.label} | `{name}`{' (' + where + ')' if where else ''} | "
                             f"{paper_numbers(config)} | {recipe(config)} |")
        if table.note:
            lines += ["", table.note]
        lines.append("")
    lines += ["## Every experiment", "", "| experiment | description | source | needs |", "|---|---|---|---|"]
    for name, config in configs.items():
        source = ", ".join(part for part in (config.paper.source, config.paper.table) if part) or "—"
        lines.append(f"| `{name}` | {config.description} | {source} | {config.paper.requires or '—'} |")
    return "\n".join(lines) + "\n"
