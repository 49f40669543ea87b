"""python -m deeplab_lit.report --runs DIR [--out DIR] [--wandb ENTITY/PROJECT [--sweep ID]] [--log-wandb]

The ablation dashboard: every ablation table of the four papers, paper vs ours. Runs come from local run directories
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

from deeplab_lit.report.aggregate import (
    Agreement, Cell, RowResult, TableResult, aggregate_row, build_report, describe_protocol, eval_protocol, matches,
    one_per_seed, recipe_changes, row_notes, unmatched)
from deeplab_lit.report.cli import main
from deeplab_lit.report.plan import Plan, grid_points, plan, point_config, run_cost_flops
from deeplab_lit.report.render import (
    agreement_lines, fmt, fmt_ours, log_to_wandb, markdown_table, render_figure, render_html, render_markdown,
    table_cells, table_header, WANDB_COLUMNS, wandb_rows, write_report)
from deeplab_lit.report.sources import RunRecord, load_local, load_wandb
from deeplab_lit.report.tables import TABLES, Column, Row, Table, experiment_config, paper_number, row
