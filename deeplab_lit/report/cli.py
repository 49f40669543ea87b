"""The command line of `python -m deeplab_lit.report` (see the package docstring)."""
from __future__ import annotations

import argparse
from pathlib import Path

from deeplab_lit.errors import UserError
from deeplab_lit.report.dashboard import build_dashboard
from deeplab_lit.report.plan import plan
from deeplab_lit.report.render import log_to_wandb, markdown_table, verdict_counts, write_report
from deeplab_lit.report.sources import load_local, load_wandb
from deeplab_lit.report.stats import Bootstrap

DESCRIPTION = ("The ablation dashboard: every ablation table of the four papers, paper vs ours with intervals "
               "and the significance of every ordering the papers claim, from local run directories "
               "(summary.json, per_image.npz, metrics.csv) and/or W&B.")


def parse_args(argv: list[str]):
    parser = argparse.ArgumentParser(prog="python -m deeplab_lit.report", description=DESCRIPTION)
    parser.add_argument("--runs", action="append", default=[], metavar="DIR",
                        help="run directories to read summary.json files from (repeatable)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read finished runs from this W&B project")
    parser.add_argument("--sweep", metavar="ID", help="only the runs of this sweep (with --wandb)")
    parser.add_argument("--out", default="report", metavar="DIR", help="output directory (default report/)")
    parser.add_argument("--wandb-mode", choices=["online", "offline"], default=None,
                        help="for --log-wandb (default: W&B's own, i.e. WANDB_MODE or online)")
    parser.add_argument("--log-wandb", nargs="?", const="", metavar="ENTITY/PROJECT",
                        help="log the tables to W&B (default: the --wandb project, else deeplab_lit)")
    parser.add_argument("--resamples", type=int, default=2000,
                        help="bootstrap resamples of the images per interval (default 2000, at least 1000)")
    parser.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the image resamples (default 0)")
    parser.add_argument("--qualitative-images", type=int, default=3, metavar="N",
                        help="images in each table's qualitative panel (default 3; 0 = no panel)")
    parser.add_argument("--confusion", action="append", default=[], metavar="TABLE[/ROW]",
                        help="add confusion matrices: every row of a table, one row (1-based number or label), "
                             "or 'all' (repeatable)")
    parser.add_argument("--catalogue", metavar="FILE", help="write the paper catalogue (docs/papers.md) and exit")
    parser.add_argument("--plan", action="store_true", help="print the sweeps' runs and GPU-hour estimates")
    parser.add_argument("--tflops", type=float, default=40.0,
                        help="--plan: sustained throughput assumed per GPU (default 40 TFLOP/s: A100-class, bf16)")
    parser.add_argument("--sweeps", default=None, metavar="DIR", help="--plan: sweep files (default: the shipped sweeps/)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.catalogue:
        from deeplab_lit.files import write_text_atomic
        from deeplab_lit.report.catalogue import render_catalogue

        print(f"wrote {write_text_atomic(args.catalogue, render_catalogue())}")
        return 0
    if args.plan:
        result = plan(Path(args.sweeps) if args.sweeps else None, args.tflops)
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
    if args.resamples < 1000:
        raise UserError(f"--resamples {args.resamples}: use at least 1000 for a 95 % interval")
    dashboard = build_dashboard(records, header, bootstrap=Bootstrap(args.resamples, args.bootstrap_seed),
                                qualitative_images=args.qualitative_images, confusion=tuple(args.confusion))
    paths = write_report(dashboard, Path(args.out))
    for section in dashboard.all_sections:
        result = section.result
        verdicts = ", ".join(f"{a.column}: {'agrees' if a.agrees else 'differs'}" for a in result.agreements)
        counts = verdict_counts(result.claims)
        tested = {k: v for k, v in counts.items() if v and k != "untested"}
        print(f"{section.anchor:<30} {result.rows_run}/{len(result.rows)} rows run"
              + (f"; ordering {verdicts}" if verdicts else "")
              + (f"; claims: {', '.join(f'{v} {k}' for k, v in tested.items())}" if tested else ""))
    print(f"wrote {paths['markdown']}, {paths['html']} and {len(dashboard.images)} figures in {paths['figures']}")
    if args.log_wandb is not None:
        target = args.log_wandb or args.wandb or "deeplab_lit"
        print(f"logged to W&B: {log_to_wandb(dashboard, target, Path(args.out), sources, args.wandb_mode)}")
    return 0

