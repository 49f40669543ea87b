"""python -m deeplab_lit.fit --experiment NAME | --config FILE [--section.key=value ...]

Trains one experiment (one paper row), validates during training, and at the end evaluates the final
model under the experiment's evaluation protocols (and the CRF where the row has it), prints a
per-class table and writes `summary.json` next to the checkpoints.

The run directory is `output_dir/NAME/<digest>-seed<seed>` unless `--run-dir` says otherwise, the
digest covering how the run differs from its experiment (infrastructure keys excluded), so the same
command (a SLURM requeue, a crashed job started again) finds its `last.ckpt` and resumes; `--resume
PATH` resumes from any checkpoint. `--config` takes a run's `config.yaml`, `--print-config` output or
your own experiment file; overrides apply on top.
"""
from __future__ import annotations

from deeplab_lit.cli import parser as command_parser
from deeplab_lit.cli import run
from deeplab_lit.config import list_experiments, resolve_experiment, resolve_file, split_overrides
from deeplab_lit.errors import UserError


def parse_args(argv: list[str]):
    parser = command_parser("python -m deeplab_lit.fit", __doc__)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--experiment", help="experiment name (see --list)")
    source.add_argument("--config", metavar="FILE", help="a config file: a run's config.yaml, --print-config "
                        "output, or your own experiment (with base: entries)")
    parser.add_argument("--list", action="store_true", help="list every experiment and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("--resume", metavar="PATH", help="resume from this checkpoint")
    parser.add_argument("--run-dir", metavar="DIR", help="where checkpoints, logs and summary.json go")
    args, rest = parser.parse_known_args(argv)
    return args, split_overrides(rest)


def main(argv: list[str]) -> int:
    args, overrides = parse_args(argv)
    if args.list:
        experiments = list_experiments()
        width = max(map(len, experiments))
        for name, description in experiments.items():
            print(f"{name:<{width}}  {description}")
        return 0
    if args.config:
        spec = resolve_file(args.config, overrides)
    elif args.experiment:
        spec = resolve_experiment(args.experiment, overrides)
    else:
        raise UserError("give --experiment NAME (see --list) or --config FILE")
    if args.print_config:
        print(spec.to_yaml(), end="")
        return 0
    from deeplab_lit.training import train

    return train(spec, args.run_dir, args.resume)


if __name__ == "__main__":
    run(main)
