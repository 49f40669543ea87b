"""python -m deeplab_lit.report --runs DIR [--out DIR] [--wandb ENTITY/PROJECT [--sweep ID]] [--log-wandb]

The ablation dashboard: every ablation table of the four papers, paper vs ours, and which of the papers'
orderings our runs reproduce significantly. Runs come from local run directories (each finished `fit`
writes `<run dir>/checkpoints/summary.json` with `per_image.npz` and `predictions/` beside it, and a CSV
log under the run directory; fully offline) and/or from W&B through its public API.

The page (`report.md`, a self-contained `report.html`, `figures/*.png`; `--log-wandb` puts the same tables
and figures into a W&B run):
- an overview: which tables ran, how many rows are within ±1 mIoU of the paper, how many of the papers'
  orderings agree (significantly or within noise) or disagree; a table of contents;
- per paper table: the paper's mIoU, ours as mean ± std over seeds with n, the 95 % interval (`stats`:
  bootstrap over images, plus the seed spread), ours − paper, the spread of one run (seeds ⊕ images),
  the evaluation protocol, "not run" where no run matches; every ordering the paper claims with our
  difference, its interval and a verdict; bars with error bars on an honest axis (from 0, or a marked
  break), the differences as a forest plot, per-class IoU across the rows (a heatmap), the runs' training
  curves, a qualitative panel (images, ground truth, each row's prediction) and, on demand
  (`--confusion TABLE[/ROW]`), confusion matrices;
- runs of paper experiments on another image set (the synthetic set) fill the same tables in a section of
  their own, never compared with the papers' numbers; runs in no table (the demo, timm: backbones) get a
  section with their curves.

`--plan` prints the reproduction plan instead: for every sweep file, its tables, runs and an estimate
of GPU hours from the networks' multiply-adds (counted on the meta device) and a stated throughput.

Choices the papers leave open, and the one made here:
- A row is a set of runs: those of its experiment(s) whose resolved config has the row's defining
  values (e.g. `model.decoder_channels=8` for v3+ Table 1), evaluated on the paper's image set. One run
  per seed counts (the one with the most training steps, then the newest), so running two sweeps that
  share a cell never double-counts.
- std is the sample standard deviation (ddof 1) over seeds; with one run there is none.
- A claimed ordering is every pair of rows (per column) whose paper numbers differ, and in two-column
  tables the two columns of each row; `stats` documents the intervals and the verdict rules. Kendall's
  tau and the deltas against the table's first row are shown too.
- Runs whose non-infrastructure overrides change the experiment (e.g. `trainer.max_steps=2`) are
  reported with those overrides in the notes, not hidden: a short debug run is visibly one.
"""
from __future__ import annotations

from deeplab_lit.report.aggregate import (
    Agreement, Cell, Claim, RowResult, TableResult, aggregate_row, build_report, describe_protocol, eval_protocol,
    matches, one_per_seed, other_data, recipe_changes, row_notes, takes, unmatched)
from deeplab_lit.report.cli import main
from deeplab_lit.report.curves import read_csv_curves
from deeplab_lit.report.dashboard import Dashboard, build_dashboard
from deeplab_lit.report.plan import Plan, grid_points, plan, point_config, run_cost_flops
from deeplab_lit.report.render import (
    agreement_lines, fmt, fmt_ours, log_to_wandb, markdown_table, render_figure, render_html, render_markdown,
    table_cells, table_header, WANDB_COLUMNS, wandb_rows, write_report)
from deeplab_lit.report.sources import RunRecord, load_local, load_wandb
from deeplab_lit.report.stats import Bootstrap
from deeplab_lit.report.tables import TABLES, Column, Row, Table, experiment_config, paper_number, row
